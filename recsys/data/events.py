"""Bring your own log: any CSV or Parquet interaction file -> a data folder, by column mapping.

    muse data import-events clicks.csv --user-col uid --item-col sku --ts-col time \\
        --label-col clicked --items catalogue.parquet --item-id-col sku --category-col cat --out DIR

Ids: integer columns are used as they are; text ids (e.g. "sku-123") become signed int64 by a
stable hash (the first 8 bytes of BLAKE2b of the UTF-8 text), the same in the log and the items
file, and the same on every run. Timestamps: integers in seconds (or --ts-unit ms/us), or
datetime / date columns, or ISO-8601 text; stored as int64 Unix seconds.

With a label column, every row is an impression (label 0/1) and the history (events) is the
positive rows, or every row with --history all. Without one, every row is a behaviour and
impressions.parquet is written empty: a model needs labelled impressions to train.
Items: from --items when given (category 0 and empty title where a column is not mapped); event
items missing from it, or every item without --items, get category 0 and an empty title.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.cli import UserError
from recsys.data.folder import finalize
from recsys.paths import DataLayout
from recsys.schema import write_contract

log = logging.getLogger(__name__)

_TS_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000}


@dataclass(frozen=True)
class EventMapping:
    """Which column of the log holds what."""

    user_col: str
    item_col: str
    ts_col: str
    label_col: str | None = None
    ts_unit: str = "s"
    history: str = "positives"  # with labels: "positives" or "all" rows become events


@dataclass(frozen=True)
class ItemMapping:
    item_id_col: str = "item_id"
    category_col: str | None = "category_id"
    title_col: str | None = "title"


def read_table(path: str | os.PathLike) -> pl.DataFrame:
    """A CSV/TSV or Parquet file as a polars frame (format from the suffix)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            return pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema_length=100_000)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise UserError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from None
    raise UserError(f"{path}: unknown format {suffix!r}; use .csv, .tsv or .parquet")


def _require(frame: pl.DataFrame, path: Path, columns: dict[str, str | None]) -> None:
    missing = {flag: col for flag, col in columns.items() if col is not None and col not in frame.columns}
    if missing:
        named = ", ".join(f"{flag} {col!r}" for flag, col in missing.items())
        raise UserError(f"{path}: no column {named}; the file has {frame.columns}")


def stable_id_hash(values: pl.Series) -> pl.Series:
    """Text ids -> signed int64, stable across runs and machines (BLAKE2b, first 8 bytes)."""
    distinct = values.unique()
    hashed = [
        int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little", signed=True)
        for v in distinct.to_list()
    ]
    return values.replace_strict(distinct, pl.Series(hashed, dtype=pl.Int64), return_dtype=pl.Int64)


def id_column(frame: pl.DataFrame, column: str, path: Path) -> pl.Series:
    """The id column as int64: integers as they are, text hashed; nulls are refused."""
    values = frame[column]
    if values.null_count():
        rows = values.is_null().arg_true()[:5].to_list()
        raise UserError(f"{path}: column {column!r} has {values.null_count()} null id(s); first rows {rows}")
    if values.dtype.is_integer():
        return values.cast(pl.Int64)
    if values.dtype in (pl.String, pl.Categorical):
        return stable_id_hash(values.cast(pl.String))
    raise UserError(f"{path}: column {column!r} has type {values.dtype}; ids must be integers or text")


def ts_column(frame: pl.DataFrame, column: str, unit: str, path: Path) -> pl.Series:
    """The time column as int64 Unix seconds."""
    values = frame[column]
    if unit not in _TS_UNITS:
        raise UserError(f"unknown --ts-unit {unit!r}; use one of {sorted(_TS_UNITS)}")
    if values.dtype.is_integer():
        return (values.cast(pl.Int64) // _TS_UNITS[unit]).rename("ts")
    if values.dtype.is_float():
        return (values // _TS_UNITS[unit]).cast(pl.Int64).rename("ts")
    if values.dtype == pl.String:
        parsed = values.str.to_datetime(strict=False, time_zone="UTC")
        bad = parsed.is_null() & values.is_not_null()
        if bad.any():
            rows = bad.arg_true()[:5].to_list()
            raise UserError(f"{path}: column {column!r} is not a date/time in rows {rows} "
                            f"(values {values.gather(rows).to_list()})")
        values = parsed
    if values.dtype == pl.Date:
        values = values.cast(pl.Datetime("us"))
    if isinstance(values.dtype, pl.Datetime):
        return values.dt.epoch("s").cast(pl.Int64).rename("ts")
    raise UserError(f"{path}: column {column!r} has type {values.dtype}; expected integer seconds or a date/time")


def convert(
    events_path: str | os.PathLike,
    mapping: EventMapping,
    layout: DataLayout,
    items_path: str | os.PathLike | None = None,
    item_mapping: ItemMapping = ItemMapping(),
) -> None:
    """Write items, events and impressions of the log into `layout` (no vocabularies yet)."""
    path = Path(events_path)
    frame = read_table(path)
    _require(frame, path, {"--user-col": mapping.user_col, "--item-col": mapping.item_col,
                           "--ts-col": mapping.ts_col, "--label-col": mapping.label_col})
    if mapping.history not in ("positives", "all"):
        raise UserError(f"unknown --history {mapping.history!r}; use 'positives' or 'all'")
    rows = pl.DataFrame({
        "user_id": id_column(frame, mapping.user_col, path),
        "item_id": id_column(frame, mapping.item_col, path),
        "ts": ts_column(frame, mapping.ts_col, mapping.ts_unit, path),
    })
    layout.root.mkdir(parents=True, exist_ok=True)
    if mapping.label_col is not None:
        label = frame[mapping.label_col]
        if label.dtype == pl.Boolean:
            label = label.cast(pl.Int8)
        if not (label.dtype.is_integer() or label.dtype == pl.Null):
            raise UserError(f"{path}: label column {mapping.label_col!r} has type {label.dtype}; expected 0/1 integers")
        impressions = rows.with_columns(label=label)
        # The contract check names the rows whose label is not 0/1.
        write_contract(impressions.to_arrow(), layout.impressions, "impressions")
        events = rows if mapping.history == "all" else rows.filter(label == 1)
    else:
        events = rows
        log.warning("%s: no --label-col: impressions.parquet is empty; training needs labelled impressions", path)
        write_contract(rows.clear().with_columns(label=pl.lit(0, pl.Int8)).to_arrow(), layout.impressions, "impressions")
    write_contract(events.to_arrow(), layout.events, "events")
    write_contract(_items(rows, items_path, item_mapping).to_arrow(), layout.items, "items")


def _items(rows: pl.DataFrame, items_path: str | os.PathLike | None, mapping: ItemMapping) -> pl.DataFrame:
    seen = rows.select("item_id").unique()
    schema = {"item_id": pl.Int64, "category_id": pl.Int64, "title": pl.String}
    if items_path is None:
        items = pl.DataFrame(schema=schema)
    else:
        path = Path(items_path)
        frame = read_table(path)
        _require(frame, path, {"--item-id-col": mapping.item_id_col})
        items = pl.DataFrame({
            "item_id": id_column(frame, mapping.item_id_col, path),
            "category_id": (id_column(frame, mapping.category_col, path) if mapping.category_col in frame.columns
                            else pl.zeros(frame.height, pl.Int64, eager=True)),
            "title": (frame[mapping.title_col].cast(pl.String).fill_null("") if mapping.title_col in frame.columns
                      else pl.Series([""] * frame.height, dtype=pl.String)),
        })
        for flag, col in (("--category-col", mapping.category_col), ("--title-col", mapping.title_col)):
            if col is not None and col not in frame.columns:
                log.warning("%s: no %s column %r: using the default for every item", path, flag, col)
    missing = seen.join(items.select("item_id"), on="item_id", how="anti")
    if items_path is not None and missing.height:
        log.warning("%d item(s) of the log are not in %s: added with category 0 and no title", missing.height, items_path)
    derived = missing.with_columns(category_id=pl.lit(0, pl.Int64), title=pl.lit("", pl.String))
    return pl.concat([items, derived.select(list(schema))]).sort("item_id")


def import_events(
    events_path: str | os.PathLike,
    mapping: EventMapping,
    out_dir: str | os.PathLike,
    items_path: str | os.PathLike | None = None,
    item_mapping: ItemMapping = ItemMapping(),
) -> DataLayout:
    """A ready data folder (tables, vocabularies, store) from a user's own log."""
    layout = DataLayout(out_dir)
    convert(events_path, mapping, layout, items_path, item_mapping)
    finalize(layout)
    return layout


def hash_ids(values: np.ndarray) -> np.ndarray:
    """The int64 ids `import-events` gives text ids (to look raw ids up after an import)."""
    return stable_id_hash(pl.Series(values, dtype=pl.String)).to_numpy()
