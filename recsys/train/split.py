"""The time-based train/test split of a data folder's impressions.

Rule: for every user, order that user's impressions by (ts, item_id, label) and put the last
`floor(test_fraction * n)` of them in the test split, the rest in train. A user with fewer than
`1 / test_fraction` impressions therefore has no test rows. Every test impression of a user is at
or after all of that user's training impressions, and histories are always cut strictly before an
impression's ts, so nothing from the future leaks into training features.

The split is written once per data folder and fraction under `splits/time-<pct>/` (train and test
Parquet files, chronological, in row groups that the streaming dataset splits across workers) and
reused by `muse train`, `muse evaluate`, the CTR benchmark and the daily pipeline. It is rebuilt
when impressions.parquet changes (size or modification time differ from the recorded ones).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.cli import UserError
from recsys.paths import DataLayout
from recsys.schema import read_contract, write_parquet_atomic

log = logging.getLogger(__name__)

DEFAULT_TEST_FRACTION = 0.1
DEFAULT_ROW_GROUP_SIZE = 16_384


@dataclass(frozen=True)
class Split:
    """Where the two halves of a split live, with their row counts."""

    train: Path
    test: Path
    train_rows: int
    test_rows: int
    test_fraction: float


def time_split(impressions: pa.Table, test_fraction: float = DEFAULT_TEST_FRACTION) -> tuple[pa.Table, pa.Table]:
    """Split an impressions table by time within each user (see the module docstring).

    Returns (train, test), each sorted by (ts, user_id, item_id).
    """
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be in (0, 1), got {test_fraction}")
    frame = pl.from_arrow(impressions)
    ordered = frame.sort(["user_id", "ts", "item_id", "label"])
    position = ordered.select(pl.int_range(pl.len()).over("user_id").alias("pos"), pl.len().over("user_id").alias("n"))
    n_test = (position["n"].cast(pl.Float64) * test_fraction).floor().cast(pl.Int64)
    is_test = position["pos"] >= position["n"] - n_test
    chronological = ["ts", "user_id", "item_id"]
    train = ordered.filter(~is_test).sort(chronological).to_arrow()
    test = ordered.filter(is_test).sort(chronological).to_arrow()
    return train, test


def split_dir(layout: DataLayout, test_fraction: float) -> Path:
    return layout.root / "splits" / f"time-{test_fraction * 100:g}pct"


def ensure_time_split(
    layout: DataLayout,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> Split:
    """Write the time split of `layout.impressions` unless an up-to-date one exists; return it."""
    source = layout.impressions
    if not source.exists():
        raise UserError(f"{source}: no impressions table (build the data folder with `muse data ...` first)")
    stat = source.stat()
    stamp = {"source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns, "test_fraction": test_fraction}
    folder = split_dir(layout, test_fraction)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in stamp.items()):
            return Split(folder / "train.parquet", folder / "test.parquet", meta["train_rows"], meta["test_rows"], test_fraction)
    log.info("splitting %s by time per user (last %g%% of each user's impressions -> test)", source, test_fraction * 100)
    train, test = time_split(read_contract(source, "impressions"), test_fraction)
    if train.num_rows == 0 or test.num_rows == 0:
        raise UserError(
            f"{source}: the time split leaves {train.num_rows} train and {test.num_rows} test rows; "
            f"users need at least {int(np.ceil(1 / test_fraction))} impressions to contribute test rows"
        )
    write_parquet_atomic(train, folder / "train.parquet", row_group_size=row_group_size)
    write_parquet_atomic(test, folder / "test.parquet", row_group_size=row_group_size)
    meta = {**stamp, "train_rows": train.num_rows, "test_rows": test.num_rows, "rule": "last floor(f*n) per user by ts"}
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    log.info("split written to %s: %d train, %d test impressions", folder, train.num_rows, test.num_rows)
    return Split(folder / "train.parquet", folder / "test.parquet", train.num_rows, test.num_rows, test_fraction)


def parquet_units(paths: list[Path]) -> list[tuple[Path, int, int]]:
    """(file, row group, rows) of every row group of `paths`, read from the footers only."""
    units = []
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        units.extend((path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
    return units
