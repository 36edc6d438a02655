"""The real daily DAG on a tiny synthetic data set: backfill, re-run, crash + resume, bad days.

One module fixture backfills three days (the expensive part, run once, about a minute on 2 cores,
most of it Ray actor start-up and model loading in the score stage); the other tests build on it.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipelines.daily import stages
from pipelines.errors import EXIT_INPUT_INVALID, EXIT_INPUT_MISSING
from pipelines.stage import CRASH_ENV
from pipelines.workspace import MARKER_NAME, Workspace
from recsys.cli import main as muse


DAYS = [dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date(2026, 1, 3)]


def _config(data_root: Path) -> dict:
    return {
        "data_root": str(data_root),
        "embed_mode": "reuse",
        "train": {"model": "muse", "batch_size": 128, "num_workers": 0, "history_len": 64, "seed": 0},
        "gauc_margin": 0.01,
        "score_batch_size": 256,
    }


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory, ray_local):
    from recsys.data.synthetic import SyntheticConfig, write

    root = tmp_path_factory.mktemp("daily")
    write(SyntheticConfig(users=40, history_len=40, items=300, topics=8, dim=16, impressions_per_user=10, days=3,
                          daily_events_per_user=5, daily_impressions_per_user=20), root / "data")
    ws = root / "ws"
    ws.mkdir()
    (ws / "pipeline.yaml").write_text(yaml.safe_dump(_config(root / "data")))
    rc = muse(["pipeline", "backfill", "--workspace", str(ws), "--start", "2026-01-01", "--end", "2026-01-03"])
    assert rc == 0
    return root, Workspace(ws)


def _fingerprints(ws: Workspace, date: dt.date) -> dict[str, str]:
    return {s.name: ws.marker(date, s.name).output_fingerprint for s in stages()}


def test_backfill_completes_every_stage_of_every_day(backfilled):
    root, ws = backfilled
    for date in DAYS:
        assert all(ws.marker(date, s.name) is not None for s in stages())
    behaviours = [ws.marker(d, "store").rows["behaviours"] for d in DAYS]
    assert behaviours[0] < behaviours[1] < behaviours[2]  # each day appends to the store
    decision = json.loads((ws.stage_dir(DAYS[1], "promote") / "decision.json").read_text())
    assert decision["champion_gauc"] is not None and decision["champion_model"].endswith("model")
    scores = pq.read_table(ws.stage_dir(DAYS[2], "score") / "scores")
    assert scores.num_rows == ws.marker(DAYS[2], "samples").rows["test"]
    assert pa.compute.all(pa.compute.and_(pa.compute.greater(scores["score"], 0), pa.compute.less(scores["score"], 1))).as_py()


def test_rerun_is_a_noop(backfilled, capsys):
    _, ws = backfilled
    before = {(d, s.name): (ws.stage_dir(d, s.name) / MARKER_NAME).stat().st_mtime_ns for d in DAYS for s in stages()}
    assert muse(["pipeline", "run", "--workspace", str(ws.root), "--date", "2026-01-03"]) == 0
    attempt = ws.read_attempt(DAYS[2])
    assert {s["status"] for s in attempt["stages"]} == {"skipped"}
    after = {(d, s.name): (ws.stage_dir(d, s.name) / MARKER_NAME).stat().st_mtime_ns for d in DAYS for s in stages()}
    assert before == after
    assert muse(["pipeline", "status", "--workspace", str(ws.root), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(DAYS) * len(stages()) and {r["state"] for r in rows} == {"done"}


def test_kill_after_registering_then_resume_matches_uninterrupted_run(backfilled, tmp_path):
    root, clean = backfilled
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(clean.root / "pipeline.yaml", ws / "pipeline.yaml")
    cmd = [sys.executable, "-m", "recsys.cli", "pipeline", "run", "--workspace", str(ws), "--date", "2026-01-01"]
    crashed = subprocess.run(cmd, env={**os.environ, CRASH_ENV: "promote:after_register"},
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    resumed = Workspace(ws)
    assert resumed.marker(DAYS[0], "train") is not None and resumed.marker(DAYS[0], "promote") is None
    assert not resumed.stage_dir(DAYS[0], "promote").exists()

    assert muse(["pipeline", "run", "--workspace", str(ws), "--date", "2026-01-01"]) == 0
    got, want = _fingerprints(resumed, DAYS[0]), _fingerprints(clean, DAYS[0])
    for data_stage in ("ingest", "embed", "store", "samples"):
        assert got[data_stage] == want[data_stage]  # byte-identical
    # Model stages: the same up to float summation order. The clean run trained in another process,
    # and torch.save writes a per-file serialization id, so their bytes may differ.
    a = torch.load(resumed.stage_dir(DAYS[0], "train") / "model" / "weights.pt", weights_only=True)
    b = torch.load(clean.stage_dir(DAYS[0], "train") / "model" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    decision = [json.loads((w.stage_dir(DAYS[0], "promote") / "decision.json").read_text()) for w in (resumed, clean)]
    assert decision[0]["champion_model"] == decision[1]["champion_model"] and decision[0]["promoted"]
    scores = [pq.read_table(w.stage_dir(DAYS[0], "score") / "scores") for w in (resumed, clean)]
    assert scores[0].drop_columns(["score"]).equals(scores[1].drop_columns(["score"]))
    np.testing.assert_allclose(scores[0]["score"].to_numpy(), scores[1]["score"].to_numpy(), atol=1e-5)
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(resumed.tracking_uri).search_model_versions("name = 'muse-ctr'")
    assert len(versions) == 1  # the version registered before the kill was reused, not duplicated


def test_malformed_or_missing_day_fails_that_date_only(backfilled):
    root, ws = backfilled
    bad_day = root / "data" / "daily" / "2026-01-04"
    bad_day.mkdir()
    shutil.copy(root / "data" / "daily" / "2026-01-03" / "events.parquet", bad_day / "events.parquet")
    impressions = pq.read_table(root / "data" / "daily" / "2026-01-03" / "impressions.parquet")
    pq.write_table(impressions.drop_columns(["label"]), bad_day / "impressions.parquet")
    before = {s.name: ws.marker(DAYS[2], s.name).output_fingerprint for s in stages()}

    rc = muse(["pipeline", "backfill", "--workspace", str(ws.root), "--start", "2026-01-03", "--end", "2026-01-05"])
    assert rc == EXIT_INPUT_INVALID
    attempt = ws.read_attempt(dt.date(2026, 1, 4))
    failed = [s for s in attempt["stages"] if s["status"] == "failed"]
    assert failed[0]["stage"] == "ingest"
    assert "2026-01-04/impressions.parquet" in failed[0]["message"] and "label" in failed[0]["message"]
    assert not ws.stage_dir(dt.date(2026, 1, 4), "ingest").exists()
    assert ws.read_attempt(dt.date(2026, 1, 5)) is None  # stopped at the bad date
    assert {s.name: ws.marker(DAYS[2], s.name).output_fingerprint for s in stages()} == before

    shutil.rmtree(bad_day)
    rc = muse(["pipeline", "run", "--workspace", str(ws.root), "--date", "2026-01-04"])
    assert rc == EXIT_INPUT_MISSING
    message = ws.read_attempt(dt.date(2026, 1, 4))["stages"][0]["message"]
    assert "2026-01-04/events.parquet" in message
