"""Benchmark of the GSU op (`kernels.cosine_topk`) on this machine, every method in the same run.

For each history length L and candidate count C (D = 128, K = 50) it times the CPU fast path
(with the fused native screen where this CPU runs it, and again with the portable torch screen;
where the fast path screens from the table's int8 copy, also from the bf16 copy alone),
the reference (`kernels.reference`: float32 matmul + stable sort, exact ties), a plain
float32-matmul + `torch.topk` baseline, and FAISS (`faiss.knn` per user on the gathered,
normalised rows; its gather is timed too, it cannot read the table by id). It also measures this
machine's own limits in the same run (a large memory copy for bytes/s, the faster of a 2048^3
matmul and one of the screen's shape for FLOP/s)
and reports the fast path's achieved rates against them, the peak resident memory each method adds,
and how often the fast path returns exactly the reference's positions. The one-off cost of the
fast path's normalised bf16 copy of the table is reported apart (`table_copy_once_s`), and so is
its int8 copy's where the fast path screens from it (`int8_copy_once_s`, with the candidates' form
its first screens settled on: `screen_precision`, see kernels/screen_precision.py).

    python benchmarks/gsu.py            # L in {1e3, 1e4, 1e5} x C in {1, 100, 1000}
    python benchmarks/gsu.py --quick    # small run (a minute)
    python benchmarks/gsu.py --lengths 100000 --candidates 100 --catalogue near-duplicates
    python benchmarks/gsu.py --lengths 100000 --candidates 100 --int8-rows-per-candidate 0  # int8 copy forced

Writes the JSON to benchmarks/results/gsu.json (atomically) and prints it, then a table.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

import kernels.cpu_topk as cpu_topk
from kernels import cosine_topk, native
from kernels.cpu_topk import _table_prep
from kernels.scratch import scratch_bytes
from kernels.screen_precision import LEVEL_NAMES

RESULTS = Path(__file__).resolve().parent / "results" / "gsu.json"


class PeakRss:
    """Peak resident memory above the starting point while the block runs (sampled every ms)."""

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def added_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Every time is the best of at least `repeats` runs and of at least this many seconds of runs
# (within the budget): ten runs of a 2 ms call sample 20 ms of a noisy machine, ten of a 0.5 s
# one 5 s; the minimum of a short window is the noisier one, whichever side of a ratio it is on.
MIN_SAMPLE_S = 0.25


def timed(fn, repeats: int, budget_s: float) -> tuple[float, float, object]:
    """(best seconds, peak added MB, last result).

    One run under the memory sampler (a thread waking every ms: on 2 busy cores it preempts the
    timed threads, +20% on a 5 ms call), then timed runs without it: `repeats` of them and at
    least MIN_SAMPLE_S seconds of them, stopping once `budget_s` is spent (at least one).
    """
    with PeakRss() as mem:
        result = fn()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < repeats or spent < MIN_SAMPLE_S:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
        if spent > budget_s:
            break
    return best, mem.added_mb, result


def machine_limits(repeats: int, dim: int) -> dict[str, float]:
    """Bytes/s of a 512 MiB copy, and FLOP/s of matmuls in float32 and bfloat16.

    The compute limit of a dtype is the better of two matmuls: 2048^3, and the screen's own shape
    (65,536 rows of `dim` times 256 columns, no gather), which runs faster on CPUs with matrix
    units; taking the better one, at least 10 runs after an untimed first one (a cold first call
    once measured bf16 at half its rate), keeps the bound from flattering the fast path.
    """
    src = torch.ones(2**27)  # 512 MiB
    dst = torch.empty_like(src)
    copy_s, _, _ = timed(lambda: dst.copy_(src), repeats, 5.0)
    out = {"copy_bytes_per_s": 2 * src.numel() * 4 / copy_s}
    shapes = {"square": (2048, 2048, 2048), "screen": (65_536, dim, 256)}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        rates = []
        for shape_name, (m, inner, n) in shapes.items():
            a, b = torch.randn(m, inner).to(dtype), torch.randn(inner, n).to(dtype)
            product = torch.empty(m, n, dtype=dtype)
            mm_s, _, _ = timed(lambda: torch.mm(a, b, out=product), max(repeats, 10), 5.0)
            out[f"matmul_{name}_{shape_name}_flop_per_s"] = 2 * m * inner * n / mm_s
            rates.append(2 * m * inner * n / mm_s)
        out[f"matmul_{name}_flop_per_s"] = max(rates)
    return out


# Catalogue shapes: random unit rows (cosines of ~0.3 at the k-th), or items around 50 topic
# centres, moderately spread (k-th ~0.6) or near duplicates (k-th ~0.93, thousands of behaviours
# within bf16 rounding of each other: the screen's hardest case).
CATALOGUES = {"random": None, "clusters": 1.0, "near-duplicates": 0.3}


def make_inputs(n_items: int, dim: int, dtype: torch.dtype, users: int, length: int, n_cands: int, seed: int,
                catalogue: str = "random"):
    gen = torch.Generator().manual_seed(seed)
    spread = CATALOGUES[catalogue]
    if spread is None:
        table = torch.nn.functional.normalize(torch.randn(n_items + 1, dim, generator=gen), dim=1)
    else:
        centres = torch.nn.functional.normalize(torch.randn(50, dim, generator=gen), dim=1)
        topics = torch.randint(0, 50, (n_items + 1,), generator=gen)
        noise = torch.randn(n_items + 1, dim, generator=gen) * (spread / dim**0.5)
        table = torch.nn.functional.normalize(centres[topics] + noise, dim=1)
    table[0] = 0
    table = table.to(dtype)
    history = torch.randint(1, n_items + 1, (users, length), generator=gen)
    candidates = torch.randint(1, n_items + 1, (users, n_cands), generator=gen)
    lengths = torch.full((users,), length, dtype=torch.int64)
    return table, candidates, history, lengths


def torch_topk_baseline(table, candidates, history, lengths, k):
    """float32 gather + normalise + matmul + torch.topk: the obvious version, without tie order."""
    rows = torch.nn.functional.normalize(table[history].float(), dim=-1)
    cands = torch.nn.functional.normalize(table[candidates].float(), dim=-1)
    return (cands @ rows.transpose(1, 2)).topk(min(k, history.shape[1]), dim=-1)


def faiss_baseline(table, candidates, history, lengths, k):
    import faiss

    results = []
    for b in range(history.shape[0]):
        rows = torch.nn.functional.normalize(table[history[b, : lengths[b]]].float(), dim=-1)
        cands = torch.nn.functional.normalize(table[candidates[b]].float(), dim=-1)
        results.append(faiss.knn(cands.numpy(), rows.numpy(), min(k, rows.shape[0]), metric=faiss.METRIC_INNER_PRODUCT))
    return results


def _with_setting(name: str, value, fn):
    """Runs fn with the module setting cpu_topk.<name> = value (USE_NATIVE = False: the portable
    torch screen; USE_INT8 = False: the fused screen from the bf16 copy only)."""
    saved = getattr(cpu_topk, name)
    setattr(cpu_topk, name, value)
    try:
        return fn()
    finally:
        setattr(cpu_topk, name, saved)


def run_config(table, candidates, history, lengths, k, repeats, limits, skip_reference):
    users, length = history.shape
    n_cands, dim = candidates.shape[1], table.shape[1]
    budget = 3.0
    # The screened strategy keeps a normalised bf16 copy of the table, built on first use and
    # reused while the table is unchanged: timed apart, once, so the fast path's time is per call.
    start = time.perf_counter()
    prep = _table_prep(table)
    copy_s = time.perf_counter() - start
    int8_copy_s = None
    if prep is not None and prep.screen is not None and native.int8_available() and cpu_topk._int8_pays(length, n_cands):
        start = time.perf_counter()
        cpu_topk._int8_copy(table, prep)  # built by the first call that screens from it: timed apart too
        int8_copy_s = time.perf_counter() - start
    fast_s, fast_mb, (_, fast_pos) = timed(lambda: cosine_topk(table, candidates, history, lengths, k), repeats, budget)
    # The fast path keeps its chunk buffers between calls: they are not in the per-call peak.
    row = {"L": length, "C": n_cands, "B": users, "fast_s": fast_s, "fast_peak_mb": fast_mb,
           "fast_kept_buffers_mb": scratch_bytes() / 2**20, "table_copy_once_s": copy_s, "int8_copy_once_s": int8_copy_s}
    if int8_copy_s is not None:  # what the fast path's first screens read after the timed calls
        row["screen_precision"] = LEVEL_NAMES[prep.precision.level]
    baselines = {
        "torch_screen": lambda: _with_setting("USE_NATIVE", False, lambda: cosine_topk(table, candidates, history, lengths, k)),
        "torch_topk": lambda: torch_topk_baseline(table, candidates, history, lengths, k),
        "faiss": lambda: faiss_baseline(table, candidates, history, lengths, k),
    }
    if not skip_reference:
        baselines["reference"] = lambda: cosine_topk(table, candidates, history, lengths, k, impl="reference")
    if not native.available():
        del baselines["torch_screen"]  # the fast path already is the torch screen
    if native.int8_available() and cpu_topk._int8_pays(length, n_cands):
        # the fast path screens from the int8 copy here: the same path from the bf16 copy beside it
        baselines["bf16_screen"] = lambda: _with_setting("USE_INT8", False, lambda: cosine_topk(table, candidates, history, lengths, k))
    # Not a baseline but a yardstick: gathering the history's rows alone, as the screen reads them
    # (the bf16 copy, torch's parallel index_select into a preallocated buffer), with nothing
    # computed: how close random rows come to the copy bandwidth.
    source = prep.screen if prep is not None and prep.screen is not None else table
    ids = history[lengths.unsqueeze(1) > torch.arange(length)]
    gathered = torch.empty(ids.numel(), dim, dtype=source.dtype)
    row["row_gather_s"], _, _ = timed(lambda: torch.index_select(source, 0, ids, out=gathered), repeats, budget)
    row["fast_over_row_gather"] = fast_s / row["row_gather_s"]
    for name, fn in baselines.items():
        seconds, peak, result = timed(fn, repeats, budget)
        row[f"{name}_s"], row[f"{name}_peak_mb"] = seconds, peak
        row[f"speedup_vs_{name}"] = seconds / fast_s
        if name == "reference":
            row["positions_equal_reference"] = float((result[1] == fast_pos).float().mean())

    flops = 2.0 * users * n_cands * length * dim
    moved = users * length * (8 + dim * table.element_size()) + users * n_cands * (8 + dim * table.element_size() + k * 12)
    screen = "bfloat16" if n_cands >= 8 else "float32"
    compute_s = flops / limits[f"matmul_{screen}_flop_per_s"]
    memory_s = moved / limits["copy_bytes_per_s"]
    row.update(
        flops=flops,
        bytes=moved,
        achieved_flop_per_s=flops / fast_s,
        achieved_bytes_per_s=moved / fast_s,
        binding_limit="compute" if compute_s >= memory_s else "memory",
        limit_s=max(compute_s, memory_s),
        fast_over_limit=fast_s / max(compute_s, memory_s),
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run: L in {1e3, 1e4}, C in {1, 100}")
    parser.add_argument("--items", type=int, default=None, help="table rows (default 1,000,000; quick 100,000)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "int8"], default="float16")
    parser.add_argument("--catalogue", choices=list(CATALOGUES), default="random",
                        help="item embeddings: random unit rows, or topic clusters (moderate or near-duplicate)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (best is kept)")
    parser.add_argument("--behaviours", type=int, default=100_000,
                        help="users per config = max(1, behaviours // L), so every config scans as many behaviours")
    parser.add_argument("--max-reference-scores", type=float, default=2e8,
                        help="skip the reference where B*C*L exceeds this (its [B, C, L] sort)")
    parser.add_argument("--lengths", type=int, nargs="+", help="history lengths L (overrides the grid)")
    parser.add_argument("--candidates", type=int, nargs="+", help="candidate counts C (overrides the grid)")
    parser.add_argument("--int8-rows-per-candidate", type=int, default=None,
                        help="screen from the int8 copy from this many history rows per candidate on "
                             "(default kernels.cpu_topk.INT8_MIN_ROWS_PER_CANDIDATE; 0: wherever it runs)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.int8_rows_per_candidate is not None:
        cpu_topk.INT8_MIN_ROWS_PER_CANDIDATE = args.int8_rows_per_candidate

    lengths_grid = args.lengths or ([1_000, 10_000] if args.quick else [1_000, 10_000, 100_000])
    cands_grid = args.candidates or ([1, 100] if args.quick else [1, 100, 1_000])
    n_items = args.items or (100_000 if args.quick else 1_000_000)
    repeats = args.repeats or (3 if args.quick else 10)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}[args.dtype]

    print(f"measuring machine limits ({torch.get_num_threads()} threads)...", flush=True)
    limits = machine_limits(repeats, args.dim)
    rows = []
    for length in lengths_grid:
        for n_cands in cands_grid:
            users = max(1, args.behaviours // length)
            print(f"L={length:,} C={n_cands:,} B={users}...", flush=True)
            table, candidates, history, lens = make_inputs(n_items, args.dim, torch.float32, users, length, n_cands,
                                                         seed=length + n_cands, catalogue=args.catalogue)
            if dtype == torch.int8:
                table = torch.trunc(table * 127).to(torch.int8)
            else:
                table = table.to(dtype)
            skip_ref = users * n_cands * length > args.max_reference_scores
            rows.append(run_config(table, candidates, history, lens, args.k, repeats, limits, skip_ref))

    result = {
        "benchmark": "gsu.cosine_topk",
        "settings": {"items": n_items, "dim": args.dim, "k": args.k, "table_dtype": args.dtype, "catalogue": args.catalogue,
                     "threads": torch.get_num_threads(), "repeats": repeats, "min_sample_s": MIN_SAMPLE_S,
                     "torch": torch.__version__,
                     "int8_min_rows_per_candidate": cpu_topk.INT8_MIN_ROWS_PER_CANDIDATE,
                     "screen": "native AMX" if native.available() else f"torch ({native.unavailable_reason()})"},
        "machine_limits": limits,
        "results": rows,
    }
    write_results(result, args.out)
    print_table(result)
    return 0


def write_results(result: dict, out: Path) -> None:
    """Writes `result` as JSON to `out` (a temporary name, then renamed) and prints it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(result, tmp, indent=2)
    os.replace(tmp.name, out)
    print(json.dumps(result, indent=2))


def print_table(result: dict) -> None:
    limits = result["machine_limits"]
    print(f"\nscreen of the fast path: {result['settings']['screen']}")
    print(
        f"\nmachine: copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul fp32 "
        f"{limits['matmul_float32_flop_per_s'] / 1e9:.0f} GFLOP/s, bf16 {limits['matmul_bfloat16_flop_per_s'] / 1e9:.0f} GFLOP/s"
    )
    header = ("L", "C", "B", "fast ms", "gather ms", "bf16-screen ms", "torch-screen ms", "ref ms", "topk ms", "faiss ms",
              "x bf16-screen", "x torch-screen", "x ref", "x topk", "x faiss",
              "limit ms", "fast/limit", "bound", "fast MB", "kept MB", "ref MB", "same pos")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in result["results"]:
        def ms(key):
            return f"{r[key] * 1e3:.1f}" if key in r else "-"

        def ratio(key):
            return f"{r[key]:.1f}" if key in r else "-"

        print(" | ".join([
            f"{r['L']:,}", f"{r['C']:,}", str(r["B"]), ms("fast_s"), ms("row_gather_s"), ms("bf16_screen_s"), ms("torch_screen_s"),
            ms("reference_s"), ms("torch_topk_s"), ms("faiss_s"), ratio("speedup_vs_bf16_screen"), ratio("speedup_vs_torch_screen"),
            ratio("speedup_vs_reference"), ratio("speedup_vs_torch_topk"), ratio("speedup_vs_faiss"),
            ms("limit_s"), f"{r['fast_over_limit']:.1f}", r["binding_limit"], f"{r['fast_peak_mb']:.0f}",
            f"{r['fast_kept_buffers_mb']:.0f}",
            f"{r['reference_peak_mb']:.0f}" if "reference_peak_mb" in r else "-",
            f"{r['positions_equal_reference']:.4f}" if "positions_equal_reference" in r else "-",
        ]))


if __name__ == "__main__":
    raise SystemExit(main())
