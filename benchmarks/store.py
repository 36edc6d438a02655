"""Benchmark of the foundation at lifelong scale: synthetic generation, SequenceStore build, history().

1. Generates a synthetic folder (default 1,000 users x 100,000 behaviours = 100M events) in a
   child process: wall time, CPU time and peak resident memory (the child's ru_maxrss) of the
   whole `muse data synthetic` path (tables, vocabularies, store, embedding tables); "seconds"
   excludes the child's imports.
2. Rebuilds the store alone from that folder's events.parquet in another child process: the
   build time and peak memory (targets: under 60 s and 4 GB on 2 cores).
   Before both, the numpy generation alone (no files) is timed the same way.
3. Times `SequenceStore.history()` for batches of 256 random users at random cut times, at
   max_len 1,000 / 10,000 / 100,000, after one warm-up batch (page cache hot), side by side with
   a one-gather baseline (numpy fancy indexing of all [B, W] positions) on the same batches.

    python benchmarks/store.py                         # full scale (a few minutes, ~2 GB disk)
    python benchmarks/store.py --users 100 --history-len 10000   # quick
    python benchmarks/store.py --data DIR --reuse      # reuse a folder generated before

Prints the JSON and writes it to benchmarks/results/store.json. Machine facts (cores, load
average) are recorded with it: on a shared machine the load changes every number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "store.json"


def _child(code: str) -> dict:
    """Run python `code` in a child process; its last stdout line is JSON. Adds peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    out = proc.stdout.read().strip().splitlines()
    if os.waitstatus_to_exitcode(status) != 0 or not out:
        raise SystemExit(f"child failed ({status}): {code}")
    result = json.loads(out[-1])
    # CPU seconds (user + system) depend much less than wall time on what else the machine runs.
    result.update(wall_s=round(wall, 2), cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
                  peak_rss_mb=round(usage.ru_maxrss / 1024, 1))
    return result


def generate(args: argparse.Namespace) -> dict:
    code = (
        "import json, time\n"
        "from recsys.data.synthetic import SyntheticConfig, write\n"
        f"c = SyntheticConfig(users={args.users}, history_len={args.history_len}, items={args.items}, seed=0)\n"
        "t = time.perf_counter()\n"
        f"write(c, {str(args.data)!r})\n"
        "print(json.dumps({'seconds': round(time.perf_counter() - t, 2)}))\n"
    )
    return _child(code)


def generate_only(args: argparse.Namespace) -> dict:
    """The numpy generation alone (every block produced, then dropped): no Parquet, no store."""
    code = (
        "import json, time\n"
        "from recsys.data import synthetic\n"
        f"c = synthetic.SyntheticConfig(users={args.users}, history_len={args.history_len}, items={args.items}, seed=0)\n"
        "t = time.perf_counter()\n"
        "rows = sum(len(b.events['item']) for b in synthetic._blocks(c, synthetic.build_world(c)))\n"
        "print(json.dumps({'seconds': round(time.perf_counter() - t, 2), 'behaviours': rows}))\n"
    )
    return _child(code)


def build(args: argparse.Namespace) -> dict:
    code = (
        "import json, time\n"
        "from recsys.data.folder import build_store\n"
        "from recsys.paths import DataLayout\n"
        "t = time.perf_counter()\n"
        f"store = build_store(DataLayout({str(args.data)!r}))\n"
        "print(json.dumps({'seconds': round(time.perf_counter() - t, 2), 'behaviours': store.num_behaviours}))\n"
    )
    return _child(code)


def gather_baseline(store, users: np.ndarray, before_ts: np.ndarray, max_len: int) -> list[np.ndarray]:
    """The one-gather alternative to history()'s per-row copies, for the side-by-side timing."""
    start, end = store._ranges(users)
    cut = store._cut(start, end, before_ts)
    lengths = np.minimum(cut - start, max_len)
    cols = np.arange(max_len)
    mask = cols[None, :] < lengths[:, None]
    index = np.where(mask, (cut - lengths)[:, None] + cols[None, :], 0)
    return [np.where(mask, np.take(a, index).astype(np.int64), 0) for a in (store._items, store._cats, store._ts)]


def history_throughput(args: argparse.Namespace) -> list[dict]:
    import torch

    from recsys.store import SequenceStore

    torch.set_num_threads(2)
    store = SequenceStore.open(Path(args.data) / "store")
    ts = np.load(Path(args.data) / "store" / "ts.npy", mmap_mode="r")
    sample = np.asarray(ts[:: max(1, len(ts) // 100_000)])
    lo, hi = int(sample.min()), int(sample.max()) + 1
    rng = np.random.default_rng(0)
    rows = []
    for max_len in args.max_lens:
        batches = [(rng.integers(1, store.num_users + 1, args.batch), rng.integers(lo, hi, args.batch))
                   for _ in range(args.repeats + 1)]
        timings = {"history": [], "one_gather": []}
        returned = 0
        for i, (users, cut) in enumerate(batches):
            t = time.perf_counter()
            batch = store.history(users, cut, max_len)
            elapsed = time.perf_counter() - t
            t = time.perf_counter()
            base = gather_baseline(store, users, cut, max_len)
            base_elapsed = time.perf_counter() - t
            if not np.array_equal(base[0], batch.item_ids.numpy()):
                raise SystemExit("history() and the baseline disagree")
            if i:  # batch 0 warms the page cache
                timings["history"].append(elapsed)
                timings["one_gather"].append(base_elapsed)
                returned += int(batch.lengths.sum())
        hist, base = np.median(timings["history"]), np.median(timings["one_gather"])
        rows.append({
            "max_len": max_len,
            "batch": args.batch,
            "history_ms_per_batch": round(hist * 1e3, 2),
            "history_batches_per_s": round(1 / hist, 2),
            "behaviours_per_s": round(returned / sum(timings["history"]), 0),
            "one_gather_ms_per_batch": round(base * 1e3, 2),
            "speedup_vs_one_gather": round(base / hist, 2),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--history-len", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--data", type=Path, help="folder for the generated data (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="skip generation when --data is already complete")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-lens", type=lambda s: [int(x) for x in s.split(",")], default=[1_000, 10_000, 100_000])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="muse-bench-store-") as tmp:
        args.data = args.data or Path(tmp) / "data"
        result = {
            "machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
            "config": {"users": args.users, "history_len": args.history_len, "items": args.items},
        }
        from recsys.data.folder import is_complete
        from recsys.paths import DataLayout

        result["generate_events_only"] = generate_only(args)
        if not (args.reuse and is_complete(DataLayout(args.data))):
            result["generate_folder"] = generate(args)
        result["store_build"] = build(args)
        result["store_build"]["targets"] = {"seconds": 60, "peak_rss_mb": 4096}
        result["history"] = history_throughput(args)
        result["machine"]["loadavg_after"] = os.getloadavg()

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = RESULTS.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_path, RESULTS)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
