"""Daily pipeline benchmark: wall time of every stage for one day of synthetic data, at two sizes.

Both sizes run side by side in one process (same machine state, same Ray instance): the small
set has USERS users, the large one `--scale` times more, with the same per-user daily volume,
so the ratio column shows how each stage's cost grows with the day's volume. Stage times are
read from the completion markers (started -> finished of the stage body and its commit).

    python benchmarks/pipeline.py                   # 200 and 2,000 users
    python benchmarks/pipeline.py --users 100 --scale 10 --out /tmp/bench

Prints JSON and writes benchmarks/results/pipeline.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipelines.config import PipelineConfig  # noqa: E402
from pipelines.daily import run_pipeline, stages  # noqa: E402
from pipelines.ray_runtime import ensure_ray  # noqa: E402
from pipelines.workspace import Workspace  # noqa: E402
from recsys.data.synthetic import SyntheticConfig, write  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "pipeline.json"


def run_size(root: Path, users: int, args: argparse.Namespace) -> dict:
    data = root / f"data-{users}"
    synth = SyntheticConfig(users=users, history_len=args.history, items=args.items, topics=16, dim=32,
                            impressions_per_user=10, days=1, daily_events_per_user=20, daily_impressions_per_user=20)
    write(synth, data)
    config = PipelineConfig(data_root=str(data), embed_mode="reuse",
                            train={"model": "muse", "batch_size": 256, "num_workers": 0, "history_len": args.history})
    ws = Workspace(root / f"ws-{users}")
    date = dt.date.fromisoformat(synth.start_date)
    t0 = time.perf_counter()
    [result] = run_pipeline(ws, [date], config)
    wall = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(f"pipeline failed at {users} users: {result.error}")
    per_stage = {s.name: ws.marker(date, s.name).duration_s for s in stages()}
    rows = {s.name: ws.marker(date, s.name).rows for s in stages()}
    t0 = time.perf_counter()
    run_pipeline(ws, [date], config)
    return {"users": users, "day_events": users * synth.daily_events_per_user,
            "day_impressions": users * synth.daily_impressions_per_user,
            "stage_seconds": per_stage, "rows": rows, "wall_seconds": round(wall, 3),
            "rerun_noop_seconds": round(time.perf_counter() - t0, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--history", type=int, default=200, help="behaviours per user before the day")
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary folder, deleted after)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = args.out or Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    ensure_ray()
    try:
        small = run_size(root, args.users, args)
        large = run_size(root, args.users * args.scale, args)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    ratio = {name: round(large["stage_seconds"][name] / max(small["stage_seconds"][name], 1e-3), 2)
             for name in small["stage_seconds"]}
    result = {
        "benchmark": "pipeline_daily_stages",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"history_per_user": args.history, "items": args.items, "scale": args.scale,
                     "embed_mode": "reuse", "model": "muse"},
        "small": small,
        "large": large,
        "large_over_small": ratio,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
