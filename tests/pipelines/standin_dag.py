"""Stand-ins: a three-stage DAG for the stage model, and a scorer for batch scoring.

`ingest` copies the day's raw file, `total` carries a running sum over days (cumulative state
like the sequence store), `report` writes two files, the first before a crash point, so a kill
lands mid-stage. Run as a script to drive it from a subprocess:

    python standin_dag.py WORKSPACE INPUT_ROOT DATE [DATE ...]
"""
from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from pathlib import Path

import numpy as np

from pipelines.dag import run_dates
from pipelines.stage import Stage, StageContext
from pipelines.workspace import Workspace


def _ingest(ctx: StageContext) -> None:
    values = [int(v) for v in ctx.source("numbers").read_text().split()]
    (ctx.output / "numbers.json").write_text(json.dumps(values))
    ctx.rows["numbers"] = len(values)


def _total(ctx: StageContext) -> None:
    prev = ctx.previous("total")
    running = json.loads((prev / "total.json").read_text()) if prev else 0
    day = json.loads((ctx.input("ingest") / "numbers.json").read_text())
    (ctx.output / "total.json").write_text(json.dumps(running + sum(day)))


def _report(ctx: StageContext) -> None:
    total = json.loads((ctx.input("total") / "total.json").read_text())
    (ctx.output / "part-0.txt").write_text(f"total {total}\n")
    ctx.crash_point("mid")
    (ctx.output / "part-1.txt").write_text(f"date {ctx.date}\n")


def stages() -> list[Stage]:
    return [
        Stage("ingest", _ingest, sources=lambda d, cfg: {"numbers": Path(cfg["input_root"]) / f"dt={d}" / "numbers.txt"},
              outputs=("numbers.json",)),
        Stage("total", _total, inputs=("ingest",), carries=("total",), outputs=("total.json",)),
        Stage("report", _report, inputs=("total",), outputs=("part-0.txt", "part-1.txt")),
    ]


def write_inputs(root: Path, days: dict[str, list[int]]) -> None:
    for day, values in days.items():
        (root / f"dt={day}").mkdir(parents=True, exist_ok=True)
        (root / f"dt={day}" / "numbers.txt").write_text(" ".join(map(str, values)))


class HashScorer:
    """Stand-in with the Ranker's `score_batch` shape contract: a fixed function of (user, item, ts)."""

    def __init__(self, created_dir: str):
        Path(created_dir, uuid.uuid4().hex).touch()  # one file per construction

    @staticmethod
    def probability(user, item, ts):
        return 1.0 / (1.0 + np.exp(-(((user * 31 + item * 7 + ts) % 101) / 50.0 - 1.0)))

    def score_batch(self, users, candidates, ts):
        assert candidates.ndim == 2 and users.shape == ts.shape == (candidates.shape[0],)
        probs = self.probability(users[:, None], candidates, ts[:, None]).astype(np.float32)
        return type("Scores", (), {"probabilities": probs})()


if __name__ == "__main__":
    workspace, input_root, *dates = sys.argv[1:]
    results = run_dates(stages(), Workspace(workspace), [dt.date.fromisoformat(d) for d in dates],
                        {"input_root": input_root})
    sys.exit(0 if all(r.ok for r in results) else results[-1].error.exit_code)
