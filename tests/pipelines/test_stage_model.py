"""The stage model on a stand-in DAG: skip when complete, crash safety, staleness, failures."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.dag import run_dates, status_rows
from pipelines.errors import EXIT_INPUT_MISSING, InputMissing, WorkspaceBusy
from pipelines.stage import CRASH_ENV
from pipelines.workspace import MARKER_NAME, Workspace

sys.path.insert(0, str(Path(__file__).parent))
import standin_dag  # noqa: E402

D1, D2, D3 = (dt.date(2024, 3, d) for d in (1, 2, 3))
DAYS = {"2024-03-01": [1, 2, 3], "2024-03-02": [10], "2024-03-03": [100, 200]}


@pytest.fixture()
def setup(tmp_path):
    inputs = tmp_path / "inputs"
    standin_dag.write_inputs(inputs, DAYS)
    return Workspace(tmp_path / "ws"), {"input_root": str(inputs)}


def _fingerprints(ws: Workspace) -> dict[tuple[str, str], str]:
    return {(d.isoformat(), s.name): ws.marker(d, s.name).output_fingerprint
            for d in ws.dates() for s in standin_dag.stages()}


def test_backfill_runs_in_order_and_carries_state(setup):
    ws, cfg = setup
    results = run_dates(standin_dag.stages(), ws, [D3, D1, D2], cfg)
    assert [r.date for r in results] == [D1, D2, D3] and all(r.ok for r in results)
    totals = [json.loads((ws.stage_dir(d, "total") / "total.json").read_text()) for d in (D1, D2, D3)]
    assert totals == [6, 16, 316]
    marker = ws.marker(D2, "ingest")
    assert marker.rows == {"numbers": 1} and marker.duration_s >= 0 and marker.started <= marker.finished
    assert set(ws.marker(D2, "total").inputs) == {"ingest", "previous:total"}


def test_rerun_is_a_noop(setup):
    ws, cfg = setup
    run_dates(standin_dag.stages(), ws, [D1, D2], cfg)
    before = {(d, s.name): (ws.stage_dir(d, s.name) / MARKER_NAME).stat().st_mtime_ns
              for d in (D1, D2) for s in standin_dag.stages()}
    results = run_dates(standin_dag.stages(), ws, [D1, D2], cfg)
    assert {o.status for r in results for o in r.outcomes} == {"skipped"}
    after = {(d, s.name): (ws.stage_dir(d, s.name) / MARKER_NAME).stat().st_mtime_ns
             for d in (D1, D2) for s in standin_dag.stages()}
    assert before == after


def test_changed_input_reruns_that_date_and_its_downstream(setup, tmp_path):
    ws, cfg = setup
    run_dates(standin_dag.stages(), ws, [D1, D2, D3], cfg)
    standin_dag.write_inputs(Path(cfg["input_root"]), {"2024-03-02": [20]})
    results = run_dates(standin_dag.stages(), ws, [D1, D2, D3], cfg)
    status = {(r.date, o.stage): o.status for r in results for o in r.outcomes}
    assert status[(D1, "total")] == "skipped"
    assert status[(D2, "ingest")] == status[(D3, "total")] == "done"
    assert json.loads((ws.stage_dir(D3, "total") / "total.json").read_text()) == 326


@pytest.mark.parametrize("point", ["report:mid", "total:before_commit"])
def test_kill_mid_stage_then_resume_matches_uninterrupted_run(setup, tmp_path, point):
    ws, cfg = setup
    script = Path(standin_dag.__file__)
    env = {**os.environ, CRASH_ENV: point}
    crashed = subprocess.run([sys.executable, str(script), str(ws.root), cfg["input_root"], "2024-03-01"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    stage = point.split(":")[0]
    # Nothing a later stage could read: no committed folder, only a dot-named staging folder.
    assert not ws.stage_dir(D1, stage).exists()
    assert any(p.name.startswith(f".{stage}.staging-") for p in ws.partition(D1).iterdir())

    assert all(r.ok for r in run_dates(standin_dag.stages(), ws, [D1], cfg))
    assert not [p for p in ws.partition(D1).iterdir() if p.name.startswith(f".{stage}.")]
    clean = Workspace(tmp_path / "clean")
    run_dates(standin_dag.stages(), clean, [D1], cfg)
    assert _fingerprints(ws) == _fingerprints(clean)


def test_missing_input_fails_that_date_and_keeps_earlier_ones(setup):
    ws, cfg = setup
    os.remove(Path(cfg["input_root"]) / "dt=2024-03-02" / "numbers.txt")
    results = run_dates(standin_dag.stages(), ws, [D1, D2, D3], cfg)
    assert [r.ok for r in results] == [True, False]  # D3 is not attempted
    err = results[-1].error
    assert isinstance(err, InputMissing) and err.exit_code == EXIT_INPUT_MISSING
    assert "dt=2024-03-02/numbers.txt" in str(err)
    assert ws.marker(D1, "report") is not None
    rows = {(r["dt"], r["stage"]): r for r in status_rows(standin_dag.stages(), ws)}
    assert rows[("2024-03-02", "ingest")]["state"] == "failed"
    assert "numbers.txt" in rows[("2024-03-02", "ingest")]["message"]
    # A later date cannot skip over the incomplete one: its cumulative input is missing.
    results = run_dates(standin_dag.stages(), ws, [D3], cfg)
    assert isinstance(results[0].error, InputMissing) and "2024-03-02" in str(results[0].error)


def test_second_runner_is_refused(setup):
    ws, _ = setup
    with ws.lock():
        with pytest.raises(WorkspaceBusy):
            with ws.lock():
                pass


def test_a_date_never_run_is_not_skipped_over(setup):
    ws, cfg = setup
    run_dates(standin_dag.stages(), ws, [D1], cfg)
    results = run_dates(standin_dag.stages(), ws, [D3], cfg)
    assert isinstance(results[0].error, InputMissing) and "2024-03-02" in str(results[0].error)
