"""TAOBAO-MM (the MUSE paper's public data) -> contract tables, store and int8/fp16 embeddings.

Expected --src layout (conventional names; see `find_files`):

    SRC/samples/*.parquet          label_0 list<int8> one-hot ([0, 1] = click) or int 0/1,
                                   129_1 user id, 205 target item id
    SRC/user_features/*.parquet    129_1, 130_1..130_5 user attributes,
                                   150_2_180 item-id history list<int64> (oldest first),
                                   151_2_180 category-id history list<int64>
    SRC/item_features/*.parquet    205 item id, 206 category, 213, 214 attributes
    SRC/item_embeddings/*.parquet  205, 205_c list<int8> [128] (trunc(clip(v, -1, 1) * 127))

Files are classified by their *columns*, not their names, so any nesting works (single files
such as SRC/samples.parquet, train/ and test/ folders, ...). Sample files are read in path
order with paths containing "test" last, so test samples come after training ones.

There are no timestamps: a user's history is an ordered list. Its k-th behaviour (oldest
first) gets ts = k, and the user's j-th sample gets ts = len(history) + j: every sample sees
the whole history, and a point-in-time cut never mixes samples into it. ts is a position.
Item categories come from item features, else from the category history.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from recsys.cli import UserError
from recsys.data.embeddings import write_item_embeddings
from recsys.data.folder import finalize
from recsys.paths import DataLayout
from recsys.schema import validate_table, write_contract, write_parquet_atomic

log = logging.getLogger(__name__)

USER, TARGET, LABEL = "129_1", "205", "label_0"
USER_ATTRS = ("130_1", "130_2", "130_3", "130_4", "130_5")
HISTORY_ITEMS, HISTORY_CATS = "150_2_180", "151_2_180"
ITEM, CATEGORY, ITEM_ATTRS = "205", "206", ("213", "214")
EMBEDDING = "205_c"


@dataclass
class SourceFiles:
    samples: list[Path] = field(default_factory=list)
    user_features: list[Path] = field(default_factory=list)
    item_features: list[Path] = field(default_factory=list)
    embeddings: list[Path] = field(default_factory=list)


def find_files(src: str | os.PathLike) -> SourceFiles:
    """Every Parquet file under `src`, classified by the columns it holds."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: not a folder (expected the TAOBAO-MM Parquet files under it)")
    paths = sorted(src.rglob("*.parquet"), key=lambda p: ("test" in str(p.relative_to(src)).lower(), str(p)))
    found = SourceFiles()
    for path in paths:
        names = set(pq.read_schema(path).names)
        if {LABEL, USER, TARGET} <= names:
            found.samples.append(path)
        if {USER, HISTORY_ITEMS} <= names:
            found.user_features.append(path)
        if {ITEM, EMBEDDING} <= names:
            found.embeddings.append(path)
        elif {ITEM, CATEGORY} <= names and LABEL not in names:
            found.item_features.append(path)
    missing = [kind for kind in ("samples", "user_features") if not getattr(found, kind)]
    if missing:
        raise UserError(
            f"{src}: found no {' or '.join(missing)} files: samples need columns {LABEL}, {USER}, {TARGET}; "
            f"user features need {USER}, {HISTORY_ITEMS} (see docs/foundation.md for the layout)"
        )
    return found


def _labels(frame: pl.DataFrame, path: Path) -> pl.Series:
    label = frame[LABEL]
    if isinstance(label.dtype, (pl.List, pl.Array)):
        if (label.list.len() != 2).any():
            rows = (label.list.len() != 2).arg_true()[:5].to_list()
            raise UserError(f"{path}: {LABEL} must be a one-hot pair [no click, click]; rows {rows} are not")
        return label.list.get(1).cast(pl.Int8)
    return label.cast(pl.Int8)


def _histories(files: list[Path]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(users with attributes, events with positional ts, (item, category) pairs seen in histories)."""
    frames = []
    for path in files:
        names = pq.read_schema(path).names
        cols = [USER, HISTORY_ITEMS] + [c for c in (HISTORY_CATS, *USER_ATTRS) if c in names]
        frames.append(pl.read_parquet(path, columns=cols))
    raw = pl.concat(frames, how="diagonal")
    frame = raw.unique(USER, keep="first", maintain_order=True)
    if frame.height < raw.height:
        log.warning("%d repeated user-feature row(s): each user keeps its first history", raw.height - frame.height)
    attrs = [c for c in USER_ATTRS if c in frame.columns]
    users = frame.select(pl.col(USER).cast(pl.Int64).alias("user_id"), *[pl.col(a).cast(pl.Int64) for a in attrs])
    has_cats = HISTORY_CATS in frame.columns
    lists = frame.select(
        pl.col(USER).cast(pl.Int64).alias("user_id"),
        pl.col(HISTORY_ITEMS).alias("item_id"),
        *([pl.col(HISTORY_CATS).alias("category_id")] if has_cats else []),
    )
    if has_cats:
        uneven = lists["item_id"].list.len() != lists["category_id"].list.len()
        uneven = uneven.fill_null(False)
        if uneven.any():
            rows = uneven.arg_true()[:5].to_list()
            raise UserError(f"{files[0].parent}: {HISTORY_ITEMS} and {HISTORY_CATS} differ in length for users "
                            f"{lists['user_id'].gather(rows).to_list()}")
    exploded = lists.explode(["item_id", "category_id"] if has_cats else ["item_id"])
    exploded = exploded.filter(pl.col("item_id").is_not_null()).with_columns(
        pl.col("item_id").cast(pl.Int64), ts=pl.int_range(pl.len()).over("user_id").cast(pl.Int64)
    )
    pairs = (
        exploded.select("item_id", pl.col("category_id").cast(pl.Int64)).unique("item_id", keep="first")
        if has_cats
        else pl.DataFrame(schema={"item_id": pl.Int64, "category_id": pl.Int64})
    )
    return users, exploded.select("user_id", "item_id", "ts"), pairs


def _samples(files: list[Path], lengths: pl.DataFrame) -> pl.DataFrame:
    """Impressions: the user's j-th sample (file order) at ts = len(history) + j."""
    parts = []
    for path in files:
        frame = pl.read_parquet(path, columns=[LABEL, USER, TARGET])
        parts.append(pl.DataFrame({
            "user_id": frame[USER].cast(pl.Int64),
            "item_id": frame[TARGET].cast(pl.Int64),
            "label": _labels(frame, path),
        }))
    samples = pl.concat(parts).with_columns(j=pl.int_range(pl.len()).over("user_id"))
    samples = samples.join(lengths, on="user_id", how="left", maintain_order="left")
    no_history = samples["history_len"].is_null().sum()
    if no_history:
        log.warning("%d sample(s) belong to users without user features: empty history", no_history)
    return samples.select(
        "user_id", "item_id", ts=(pl.col("history_len").fill_null(0) + pl.col("j")).cast(pl.Int64), label="label"
    )


def _items(files: list[Path], pairs: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    if files:
        frames = []
        for path in files:
            names = pq.read_schema(path).names
            attrs = [c for c in ITEM_ATTRS if c in names]
            frames.append(pl.read_parquet(path, columns=[ITEM, CATEGORY, *attrs]).select(
                pl.col(ITEM).cast(pl.Int64).alias("item_id"), pl.col(CATEGORY).cast(pl.Int64).alias("category_id"),
                *[pl.col(a).cast(pl.Int64) for a in attrs]))
        features = pl.concat(frames, how="diagonal").unique("item_id", keep="first", maintain_order=True)
    else:
        features = pl.DataFrame(schema={"item_id": pl.Int64, "category_id": pl.Int64})
    # Items only seen in histories or as targets: category from the category history, else 0.
    seen = pl.concat([pairs.select("item_id"), samples.select("item_id")]).unique()
    extra = seen.join(features.select("item_id"), on="item_id", how="anti").join(pairs, on="item_id", how="left")
    extra = extra.with_columns(pl.col("category_id").fill_null(0))
    if extra.height:
        log.info("%d item(s) without item features: category taken from histories where known", extra.height)
    items = pl.concat([features, extra], how="diagonal")
    attrs = [c for c in items.columns if c not in ("item_id", "category_id")]
    return items.with_columns(*[pl.col(a).fill_null(0) for a in attrs], title=pl.lit(None, pl.String)).sort("item_id")


def _write_events(events: pl.DataFrame, path: Path) -> None:
    # Positions are distinct per user, so rows are distinct by construction.
    table = validate_table(events.to_arrow(), "events", path, deduplicate=False)
    write_parquet_atomic(table, path, compression="lz4")


def _embeddings(files: list[Path], layout: DataLayout) -> None:
    frames = [pl.read_parquet(p, columns=[ITEM, EMBEDDING]) for p in files]
    frame = pl.concat(frames).unique(ITEM, keep="first", maintain_order=True)
    dims = frame[EMBEDDING].list.len().unique().to_list()
    if len(dims) != 1:
        raise UserError(f"{files[0].parent}: {EMBEDDING} vectors have mixed lengths {sorted(dims)[:5]}")
    weights = np.stack(frame[EMBEDDING].to_numpy()).astype(np.int8) if frame.height else np.zeros((0, dims[0]), np.int8)
    write_item_embeddings(layout, frame[ITEM].cast(pl.Int64).to_numpy(), weights.astype(np.float32) / 127.0,
                          "taobao-mm", int8_weights=weights)


def load_taobao_mm(src: str | os.PathLike, out_dir: str | os.PathLike, max_per_user: int | None = None) -> DataLayout:
    """A ready data folder from the TAOBAO-MM files under `src`."""
    files = find_files(src)
    log.info("TAOBAO-MM: %d sample, %d user-feature, %d item-feature, %d embedding file(s)",
             len(files.samples), len(files.user_features), len(files.item_features), len(files.embeddings))
    layout = DataLayout(out_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    users, events, pairs = _histories(files.user_features)
    lengths = events.group_by("user_id").agg(history_len=pl.len().cast(pl.Int64))
    samples = _samples(files.samples, lengths)
    write_contract(_items(files.item_features, pairs, samples).to_arrow(), layout.items, "items")
    write_contract(users.to_arrow(), layout.users, "users")
    _write_events(events, layout.events)
    write_contract(samples.to_arrow(), layout.impressions, "impressions")
    log.info("TAOBAO-MM: %d users, %d behaviours, %d samples (positive rate %.3f)",
             users.height, events.height, samples.height, float(samples["label"].mean() or 0.0))
    finalize(layout, max_per_user)
    if files.embeddings:
        _embeddings(files.embeddings, layout)
    else:
        log.warning("%s: no item embedding files (%s, %s): the embedding stage must run before MUSE", src, ITEM, EMBEDDING)
    return layout
