"""Arrow schemas of the contract tables and their validation.

Every source (MovieLens, TAOBAO-MM, a user's own log, the generator) ends by writing these
tables; everything downstream reads only them. Contract tables hold *raw* int64 ids; dense
indices come later from `recsys.data.vocab.Vocab`.

`validate_table(table, kind, source)` checks a table against its contract and returns it
conformed (required columns first, in contract order, safely cast to the contract types).
Problems raise `ContractError` naming the file, the column and the first offending rows.
Duplicated (user_id, item_id, ts) events are dropped, with the count logged.
"""
from __future__ import annotations

import logging
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.cli import UserError

log = logging.getLogger(__name__)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("category_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
    ]
)
EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
    ]
)
IMPRESSIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
    ]
)
USERS_SCHEMA = pa.schema([pa.field("user_id", pa.int64(), nullable=False)])

# Optional columns with a fixed type; any other extra column of items/users must be int64
# (a categorical code) so that it can get a vocabulary.
OPTIONAL_FIELDS: dict[str, dict[str, pa.DataType]] = {
    "items": {"genres": pa.string(), "image": pa.string()},
    "events": {"weight": pa.float32()},
    "impressions": {},
    "users": {},
}
SCHEMAS: dict[str, pa.Schema] = {
    "items": ITEMS_SCHEMA,
    "events": EVENTS_SCHEMA,
    "impressions": IMPRESSIONS_SCHEMA,
    "users": USERS_SCHEMA,
}
# Columns that identify an entity: a null there makes the row meaningless.
ID_COLUMNS = ("user_id", "item_id", "category_id")
# Kinds whose extra columns are categorical attributes (int64 codes).
_ATTRIBUTE_KINDS = ("items", "users")
_SHOW_ROWS = 5


class ContractError(UserError):
    """A table does not meet its contract; the message names the file, column and rows."""


def validate_table(
    table: pa.Table, kind: str, source: str | os.PathLike = "<table>", deduplicate: bool = True
) -> pa.Table:
    """Check `table` against the `kind` contract ("items", "events", "impressions", "users").

    Returns the conformed table: required columns first (contract order and types), then the
    optional/attribute columns. Events are de-duplicated on (user_id, item_id, ts) unless
    `deduplicate` is False (for writers whose rows are distinct by construction).
    Raises ContractError on missing columns, uncastable types, null ids, null or negative
    timestamps, labels outside {0, 1} and duplicated item/user rows in items/users.
    """
    if kind not in SCHEMAS:
        raise ValueError(f"unknown contract kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    where = str(source)
    schema = SCHEMAS[kind]
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ContractError(
            f"{where}: missing required column(s) {missing} for the {kind} table "
            f"(has {table.column_names})"
        )
    columns: dict[str, pa.ChunkedArray] = {}
    for field in schema:
        columns[field.name] = _cast(table.column(field.name), field.type, where, field.name)
    for name in table.column_names:
        if name in columns:
            continue
        target = OPTIONAL_FIELDS[kind].get(name)
        if target is None and kind in _ATTRIBUTE_KINDS:
            target = pa.int64()
        if target is None:
            # Unknown extra columns of events/impressions are kept as they are.
            columns[name] = table.column(name)
        else:
            columns[name] = _cast(table.column(name), target, where, name)
    out = pa.table(columns)

    for name in ID_COLUMNS:
        if name in schema.names:
            _check_mask(pc.is_null(out.column(name)), where, name, "null id(s)", out.column(name))
    if "ts" in schema.names:
        ts = out.column("ts")
        _check_mask(pc.is_null(ts), where, "ts", "null timestamp(s)", ts)
        _check_mask(pc.less(ts, 0), where, "ts", "negative timestamp(s)", ts)
    if "label" in schema.names:
        label = out.column("label")
        bad = pc.or_kleene(pc.is_null(label), pc.invert(pc.is_in(label, pa.array([0, 1], pa.int8()))))
        _check_mask(bad, where, "label", "label(s) not in {0, 1}", label)

    if kind == "events" and deduplicate:
        out = drop_duplicate_events(out, where)
    elif kind in ("items", "users"):
        key = "item_id" if kind == "items" else "user_id"
        _check_unique(out.column(key), where, key)
    return out


def drop_duplicate_events(table: pa.Table, source: str = "<events>") -> pa.Table:
    """Drop repeated (user_id, item_id, ts) rows, keeping the first; logs how many were dropped."""
    n = table.num_rows
    if n == 0:
        return table
    keys = pl.from_arrow(table.select(["user_id", "item_id", "ts"]))
    first = keys.select(pl.struct(pl.all()).is_first_distinct()).to_series()
    kept = int(first.sum())
    if kept == n:
        return table
    log.warning("%s: dropped %d duplicated (user_id, item_id, ts) event(s) of %d", source, n - kept, n)
    return table.filter(first.to_arrow())


def read_contract(path: str | os.PathLike, kind: str) -> pa.Table:
    """Read a contract Parquet file and validate it (see `validate_table`)."""
    path = Path(path)
    if not path.exists():
        raise ContractError(f"{path}: the {kind} table does not exist")
    return validate_table(pq.read_table(path), kind, path)


def write_contract(table: pa.Table, path: str | os.PathLike, kind: str) -> pa.Table:
    """Validate `table` and write it atomically to `path` (temp file, then rename)."""
    path = Path(path)
    table = validate_table(table, kind, path)
    write_parquet_atomic(table, path)
    log.info("wrote %s: %d rows", path, table.num_rows)
    return table


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike, **kwargs) -> None:
    """Write a Parquet file under a temporary name in the same folder, then rename it."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path`: renamed onto it if the block succeeds, removed if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _cast(column: pa.ChunkedArray, target: pa.DataType, where: str, name: str) -> pa.ChunkedArray:
    if column.type == target:
        return column
    if _castable(column.type, target):
        try:
            return column.cast(target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ContractError(
                f"{where}: column {name!r} of type {column.type} has values that do not fit "
                f"{target}: {exc}"
            ) from None
    raise ContractError(f"{where}: column {name!r} has type {column.type}, expected {target}")


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Casts we accept silently: integer widths (checked for overflow), float widths, text kinds.

    Text to number or float to integer is refused: that is a mapping mistake, not a width.
    """
    if pa.types.is_null(source):
        return True
    if pa.types.is_integer(target):
        return pa.types.is_integer(source) or pa.types.is_boolean(source)
    if pa.types.is_floating(target):
        return pa.types.is_floating(source) or pa.types.is_integer(source)
    if pa.types.is_string(target):
        return pa.types.is_string(source) or pa.types.is_large_string(source) or pa.types.is_dictionary(source)
    return False


def _check_mask(mask: pa.ChunkedArray, where: str, name: str, what: str, values: pa.ChunkedArray) -> None:
    bad = pc.fill_null(mask, True).to_numpy(zero_copy_only=False)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    shown = rows[:_SHOW_ROWS].tolist()
    sample = values.take(pa.array(shown)).to_pylist()
    raise ContractError(
        f"{where}: column {name!r}: {len(rows)} {what}; first rows {shown} (values {sample})"
    )


def _check_unique(column: pa.ChunkedArray, where: str, name: str) -> None:
    values = column.to_numpy()
    order = np.argsort(values, kind="stable")
    repeated = order[1:][values[order[1:]] == values[order[:-1]]]
    if len(repeated):
        shown = np.sort(repeated)[:_SHOW_ROWS].tolist()
        raise ContractError(
            f"{where}: column {name!r}: {len(repeated)} repeated id(s); first rows {shown} "
            f"(values {values[shown].tolist()})"
        )
