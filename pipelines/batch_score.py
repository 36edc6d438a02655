"""Batch scoring as a Ray Data stage, with the same scorer class as the online service.

Input: Parquet with one row per (user_id int64, item_id int64, ts int64) candidate, raw ids
(the impressions contract without the label; extra columns are carried through). Output: the
same rows in the same order plus `score` float32, the click probability, written as
`part-NNNNN.parquet` files under the output folder.

Each Ray actor builds its scorer once (`scorer_factory()`, e.g. loading a `Ranker` from a model
folder) and then scores many batches: rows of one batch are grouped into requests by
(user_id, ts), requests with the same candidate count are stacked into one `score_batch` call
[B, C]. Candidates are scored independently of each other, so how rows fall into batches and
requests never changes a score: the offline score of a row equals what the online service
returns for that (user, item, ts).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import InputInvalid, InputMissing

log = logging.getLogger("pipelines")

REQUIRED_COLUMNS = {"user_id": pa.int64(), "item_id": pa.int64(), "ts": pa.int64()}


def check_candidates(path: Path) -> int:
    """Check the candidates file's columns from its footer; returns its row count."""
    if not path.exists():
        raise InputMissing(f"{path}: candidates file does not exist")
    schema = pq.read_schema(path)
    for name, typ in REQUIRED_COLUMNS.items():
        if name not in schema.names:
            raise InputInvalid(f"{path}: missing column {name!r} (has {schema.names})")
        if not pa.types.is_integer(schema.field(name).type):
            raise InputInvalid(f"{path}: column {name!r} has type {schema.field(name).type}, expected {typ}")
    return pq.ParquetFile(path).metadata.num_rows


def score_table(scorer: Any, table: pa.Table) -> pa.Table:
    """Score every row of `table` (user_id, item_id, ts, ...) with `scorer.score_batch`.

    Returns `table` with a float32 `score` column appended, rows in their input order.
    """
    frame = pl.from_arrow(table.select(list(REQUIRED_COLUMNS))).with_row_index("row")
    scores = np.empty(table.num_rows, dtype=np.float32)
    requests = frame.group_by(["user_id", "ts"], maintain_order=True).agg(pl.col("item_id"), pl.col("row"))
    requests = requests.with_columns(pl.col("item_id").list.len().alias("n"))
    for (_,), same_size in requests.group_by(["n"], maintain_order=True):
        users = same_size["user_id"].to_numpy()
        ts = same_size["ts"].to_numpy()
        candidates = np.stack(same_size["item_id"].to_numpy()).astype(np.int64)  # [B, C]
        rows = np.stack(same_size["row"].to_numpy())  # [B, C]
        probabilities = np.asarray(scorer.score_batch(users, candidates, ts).probabilities, dtype=np.float32)
        scores[rows.ravel()] = probabilities.reshape(-1)
    return table.append_column("score", pa.array(scores, pa.float32()))


class _ScoreActor:
    """A Ray Data actor: builds the scorer once, then scores batches."""

    def __init__(self, scorer_factory: Callable[[], Any]):
        self.scorer = scorer_factory()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_table(self.scorer, batch)


def _write_in_order(scored: Any, output_dir: Path, rows_per_file: int) -> None:
    """Write a scored Ray dataset as `part-NNNNN.parquet` files of up to `rows_per_file` rows, in order.

    Ray Data's own Parquet sink can put blocks into a file out of order even with
    `preserve_order` set (seen with ray 2.60: 2 runs in 5 on a 900-row input), while iterating
    the dataset does keep block order. So the scoring stays on the actors and the driver streams
    their batches into the files, each written under a temporary name and then renamed.
    """
    writer, part, rows_in_part, tmp = None, 0, 0, None

    def finish() -> None:
        writer.close()
        tmp.replace(output_dir / f"part-{part:05d}.parquet")

    for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        start = 0
        while start < batch.num_rows:
            if writer is None:
                tmp = output_dir / f".part-{part:05d}.parquet.tmp"
                writer = pq.ParquetWriter(tmp, batch.schema)
            piece = batch.slice(start, rows_per_file - rows_in_part)
            writer.write_table(piece)
            start += piece.num_rows
            rows_in_part += piece.num_rows
            if rows_in_part == rows_per_file:
                finish()
                writer, part, rows_in_part = None, part + 1, 0
    if writer is not None:
        finish()


def batch_score(candidates: Path, output_dir: Path, scorer_factory: Callable[[], Any],
                batch_size: int = 4096, actors: int = 1, rows_per_file: int = 1_000_000) -> int:
    """Score `candidates` into `output_dir` with a pool of `actors` Ray actors; returns rows scored.

    `scorer_factory` must be picklable (a module-level function or a functools.partial): it runs
    inside each actor. Ray must be initialised (see `pipelines.ray_runtime.ensure_ray`).
    """
    import ray.data

    rows = check_candidates(candidates)
    # Leave one CPU for the read and write tasks: with every CPU held by scoring actors, Ray Data
    # cannot schedule the reads that feed them and the stage waits forever.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = max(1, min(actors, cpus - 1))
    output_dir.mkdir(parents=True, exist_ok=True)
    if rows == 0:
        pq.write_table(pq.read_table(candidates).append_column("score", pa.array([], pa.float32())),
                       output_dir / "part-00000.parquet")
        return 0
    log.info("scoring %s candidate rows from %s with %d actor(s)", f"{rows:,}", candidates, actors)
    ds = ray.data.read_parquet(str(candidates))
    scored = ds.map_batches(
        _ScoreActor,
        fn_constructor_args=(scorer_factory,),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    _write_in_order(scored, output_dir, rows_per_file)
    return rows
