"""Batch scoring through Ray Data: order kept, every row scored, one scorer per actor."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.batch_score import batch_score, check_candidates, score_table
from pipelines.errors import InputInvalid, InputMissing

sys.path.insert(0, str(Path(__file__).parent))
from standin_dag import HashScorer  # noqa: E402


def _candidates(n_users=40, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        ts = 1_700_000_000 + u
        for item in rng.choice(1000, size=int(rng.integers(1, 9)), replace=False):
            rows.append((u * 13, int(item), ts))
    users, items, ts = map(np.array, zip(*rows))
    return pa.table({"user_id": users, "item_id": items, "ts": ts, "extra": np.arange(len(rows))})


def test_score_table_keeps_order_and_matches_per_row_scores(tmp_path):
    table = _candidates()
    out = score_table(HashScorer(str(tmp_path)), table)
    expected = HashScorer.probability(table["user_id"].to_numpy(), table["item_id"].to_numpy(), table["ts"].to_numpy())
    assert out.column_names == ["user_id", "item_id", "ts", "extra", "score"]
    np.testing.assert_allclose(out["score"].to_numpy(), expected, rtol=1e-6)


def test_ray_batch_score_scores_every_row_once_per_actor_load(tmp_path, ray_local):
    table = _candidates(n_users=200)
    src = tmp_path / "candidates.parquet"
    pq.write_table(table, src, row_group_size=97)
    created = tmp_path / "created"
    created.mkdir()
    # Ray's own Parquet sink reordered blocks in some runs: three runs must all keep input order.
    for run in range(3):
        out_dir = tmp_path / f"scores-{run}"
        n = batch_score(src, out_dir, functools.partial(HashScorer, str(created)), batch_size=64, actors=2,
                        rows_per_file=250)
        parts = sorted(p.name for p in out_dir.iterdir())
        assert parts == [f"part-{i:05d}.parquet" for i in range(len(parts))] and len(parts) > 1
        out = pa.concat_tables([pq.read_table(out_dir / name) for name in parts])
        assert n == table.num_rows == out.num_rows
        assert out["extra"].to_pylist() == table["extra"].to_pylist()  # input order kept
    expected = HashScorer.probability(table["user_id"].to_numpy(), table["item_id"].to_numpy(), table["ts"].to_numpy())
    np.testing.assert_allclose(out["score"].to_numpy(), expected, rtol=1e-6)
    assert 1 <= len(os.listdir(created)) <= 6  # one scorer per actor and run, not per batch


def test_candidates_are_checked(tmp_path):
    with pytest.raises(InputMissing, match="nope.parquet"):
        check_candidates(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user_id": [1], "ts": [2]}), bad)
    with pytest.raises(InputInvalid, match="item_id"):
        check_candidates(bad)
