"""The feature builder's cosines (recsys/features.py `_cosines`): native kernel against the torch path.

Every request and training batch computes the multimodal cosine of each target with its short
history (rows shared by a user's targets) and with its K selected behaviours (rows of its own),
pair by pair so that the bits never depend on the batch. This times both implementations side
by side in one run, in alternating rounds (best of 5 calls per round, median over rounds), on a
200,000-row fp16 table of 128-d unit rows:

    serving    1 user x 100 or 1,000 candidates x 50 behaviours of their own (the selected K);
    short      1 user x 100 candidates x 50 shared behaviours (the short history);
    training   256 users x 1 target x 50 behaviours of their own.

    python benchmarks/cosines.py             # 7 rounds
    python benchmarks/cosines.py --rounds 15

Prints JSON (also written to benchmarks/results/cosines.json) and a table with the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kernels import native
from recsys import features

RESULTS = Path(__file__).resolve().parent / "results" / "cosines.json"
ROWS, DIM, BEHAVIOURS = 200_000, 128, 50
CASES = {  # name: (users, targets, per-target rows)
    "serving C=100": (1, 100, True),
    "serving C=1000": (1, 1_000, True),
    "short C=100": (1, 100, False),
    "training B=256": (256, 1, True),
}


def best_of(call, repeats: int = 5) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not native.available():
        print(json.dumps({"error": f"native kernels unavailable: {native.unavailable_reason()}"}))
        return 1
    gen = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(ROWS + 1, DIM, generator=gen), dim=-1).half()
    table[0] = 0
    native_available = native.available
    rows = []
    for name, (users, targets, per_target) in CASES.items():
        target_ids = torch.randint(1, ROWS + 1, (users, targets), generator=gen)
        ids = torch.randint(1, ROWS + 1, (users, targets, BEHAVIOURS) if per_target else (users, BEHAVIOURS), generator=gen)
        fast, slow = [], []
        try:
            for _ in range(args.rounds):
                fast.append(best_of(lambda: features._cosines(table, target_ids, ids)))
                native.available = lambda: False  # the torch path, as on a CPU without the kernels
                slow.append(best_of(lambda: features._cosines(table, target_ids, ids)))
                native.available = native_available
        finally:
            native.available = native_available
        native_s, torch_s = statistics.median(fast), statistics.median(slow)
        rows.append({"case": name, "users": users, "targets": targets, "rows_per_pair": BEHAVIOURS,
                     "rows_shared": not per_target, "native_s": native_s, "torch_s": torch_s,
                     "speedup": torch_s / native_s})
    result = {"benchmark": "cosines", "table": {"rows": ROWS, "dim": DIM, "dtype": "float16"},
              "threads": torch.get_num_threads(), "rounds": args.rounds, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as tmp_file:
        json.dump(result, tmp_file, indent=2)
    os.replace(tmp_file.name, args.out)
    print(json.dumps(result, indent=2))
    print(f"\n{'case':16s} {'native ms':>10s} {'torch ms':>10s} {'speedup':>8s}")
    for row in rows:
        print(f"{row['case']:16s} {row['native_s'] * 1e3:10.3f} {row['torch_s'] * 1e3:10.3f} {row['speedup']:7.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
