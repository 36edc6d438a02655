"""GSU on a GPU: the Triton kernel against the reference, and against the GPU's own limits.

The CUDA counterpart of benchmarks/gsu.py, on its grid of shapes (L in {1,000, 10,000,
100,000} x C in {1, 100, 1,000}, D = 128, B = max(1, behaviours // L) users so every config scans
as many behaviours, fp16 table of 1M random unit rows). For each config it times, side by side
in one run (CUDA events after warm-up calls, median of the repeats):

    triton     kernels.triton.cosine_topk (fused gather + dot + running top-K);
    reference  kernels.reference (gather, normalise, matmul, topk) on the same GPU;

and reports their ratio, the peak memory each allocates, the share of positions equal to the
reference's, and the achieved bytes/s and FLOP/s against the GPU's limits measured in the same
run: a device copy of 1 GiB for bandwidth, and matmuls of 8192^3 in fp32 without TF32 (the
kernel's `input_precision="ieee"` dot runs on the same CUDA cores) and in bf16 (tensor cores,
for reference). The bound is the larger of the memory time and the fp32 compute time.

    python benchmarks/gsu_gpu.py                      # the full grid (needs CUDA)
    python benchmarks/gsu_gpu.py --block-c 32 --block-l 256
    python benchmarks/gsu_gpu.py --splits 1                 # one program per history (no ranges)
    python benchmarks/gsu_gpu.py --sweep-splits 1 8 32 128  # also time these ranges, side by side
    TRITON_INTERPRET=1 python benchmarks/gsu_gpu.py --smoke   # a tiny config on the CPU interpreter

--smoke runs one tiny config on whatever device there is (the interpreter where there is no GPU),
so the script itself is checked where no GPU is lent (tests/kernels/test_gsu_gpu_benchmark.py).
Prints JSON (also written to benchmarks/results/gsu_gpu.json) and a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gsu import make_inputs, write_results
from kernels.reference import cosine_topk_reference

RESULTS = Path(__file__).resolve().parent / "results" / "gsu_gpu.json"


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float, object]:
    """(median seconds, peak MB allocated above the start, result) over `repeats` calls after two
    untimed ones (the first compiles the kernel)."""
    for _ in range(2):
        result = fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), 0.0, result
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return statistics.median(times), peak, result


def gpu_limits(device: torch.device, repeats: int) -> dict[str, float]:
    """Bytes/s of a 1 GiB device copy; FLOP/s of 8192^3 matmuls in fp32 (no TF32) and bf16."""
    src = torch.ones(2**28, device=device)
    dst = torch.empty_like(src)
    copy_s, _, _ = timed(lambda: dst.copy_(src), device, repeats)
    out = {"copy_bytes_per_s": 2 * src.numel() * 4 / copy_s}
    del src, dst
    n = 8192
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
            mm_s, _, _ = timed(lambda: a @ b, device, repeats)
            out[f"matmul_{name}_flop_per_s"] = 2 * n**3 / mm_s
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return out


def run_config(table, candidates, history, lengths, k, repeats, device, limits, block_c, block_l, splits,
               skip_reference, sweep=()):
    from kernels.triton.cosine_topk import cosine_topk_triton, launch_splits

    users, length = history.shape
    n_cands, dim = candidates.shape[1], table.shape[1]
    triton_s, triton_mb, (_, positions) = timed(
        lambda: cosine_topk_triton(table, candidates, history, lengths, k, block_c=block_c, block_l=block_l,
                                   splits=splits), device, repeats)
    ranges = launch_splits(table, users, n_cands, length, k, block_c=block_c, block_l=block_l, splits=splits)
    row = {"L": length, "C": n_cands, "B": users, "splits": ranges, "triton_s": triton_s,
           "triton_peak_mb": triton_mb}
    if sweep:  # the same call with other history ranges, keyed by the ranges each launches
        row["sweep_s"] = {}
        for other in sweep:
            launched = launch_splits(table, users, n_cands, length, k, block_c=block_c, block_l=block_l, splits=other)
            seconds, _, (_, swept) = timed(
                lambda: cosine_topk_triton(table, candidates, history, lengths, k, block_c=block_c, block_l=block_l,
                                           splits=other), device, repeats)
            if not torch.equal(swept, positions):
                raise AssertionError(f"L={length} C={n_cands}: {launched} ranges gave other positions than {ranges}")
            row["sweep_s"][str(launched)] = seconds
    if not skip_reference:
        reference_s, reference_mb, (_, expected) = timed(
            lambda: cosine_topk_reference(table, candidates, history, lengths, k), device, repeats)
        row.update(reference_s=reference_s, reference_peak_mb=reference_mb, speedup_vs_reference=reference_s / triton_s,
                   positions_equal_reference=float((positions == expected).float().mean()))
    flops = 2.0 * users * n_cands * length * dim
    moved = users * length * (8 + dim * table.element_size()) + users * n_cands * (8 + dim * table.element_size() + k * 12)
    if limits:
        compute_s = flops / limits["matmul_float32_flop_per_s"]
        memory_s = moved / limits["copy_bytes_per_s"]
        row.update(binding_limit="compute" if compute_s >= memory_s else "memory", limit_s=max(compute_s, memory_s),
                   triton_over_limit=triton_s / max(compute_s, memory_s))
    row.update(flops=flops, bytes=moved, achieved_flop_per_s=flops / triton_s, achieved_bytes_per_s=moved / triton_s)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny config, on the CPU interpreter without a GPU")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--behaviours", type=int, default=100_000)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 100, 1_000])
    parser.add_argument("--block-c", type=int, default=64, help="candidates per program (the kernel's BLOCK_C)")
    parser.add_argument("--block-l", type=int, default=128, help="history rows per tile (the kernel's BLOCK_L)")
    parser.add_argument("--splits", type=int, default=None,
                        help="history ranges per user (default: the kernel's choice for this GPU's SMs)")
    parser.add_argument("--sweep-splits", type=int, nargs="+", default=[],
                        help="also time each config with these history ranges (side by side, same positions checked)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-reference-scores", type=float, default=2e9,
                        help="skip the reference where B*C*L exceeds this (its [B, C, L] scores)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.items, args.dim, args.k, args.lengths, args.candidates = 200, 16, 4, [40], [3]
        args.behaviours, args.block_c, args.block_l, args.repeats = 80, 16, 16, 1
        args.splits = args.splits or 2  # the ranges and their merge too
        args.sweep_splits = args.sweep_splits or [1]
    elif not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: run with --smoke (under TRITON_INTERPRET=1) to check the script"}))
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    limits = gpu_limits(device, 5) if device.type == "cuda" else {}
    rows = []
    for length in args.lengths:
        for n_cands in args.candidates:
            users = max(1, args.behaviours // length)
            print(f"L={length:,} C={n_cands:,} B={users}...", flush=True)
            table, candidates, history, lens = make_inputs(args.items, args.dim, torch.float32, users, length, n_cands,
                                                         seed=length + n_cands)
            table, candidates, history, lens = (t.to(device) for t in (table.half(), candidates, history, lens))
            rows.append(run_config(table, candidates, history, lens, args.k, args.repeats, device, limits,
                                   args.block_c, args.block_l, args.splits,
                                   users * n_cands * length > args.max_reference_scores, args.sweep_splits))
    result = {
        "benchmark": "gsu.cosine_topk on GPU (Triton)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET)",
        "settings": {"items": args.items, "dim": args.dim, "k": args.k, "table_dtype": "float16",
                     "block_c": args.block_c, "block_l": args.block_l, "splits": args.splits or "auto", "repeats": args.repeats, "torch": torch.__version__},
        "gpu_limits": limits,
        "results": rows,
    }
    write_results(result, args.out)
    print(f"\n{'L':>8} {'C':>6} {'B':>4} {'S':>4} {'triton ms':>10} {'ref ms':>9} {'x ref':>7} {'limit ms':>9} {'/limit':>7} "
          f"{'bound':>8} {'same pos':>9}")
    for r in rows:
        print(f"{r['L']:>8,} {r['C']:>6,} {r['B']:>4} {r['splits']:>4} {r['triton_s'] * 1e3:>10.3f} "
              f"{r['reference_s'] * 1e3 if 'reference_s' in r else float('nan'):>9.3f} "
              f"{r.get('speedup_vs_reference', float('nan')):>7.1f} {r.get('limit_s', float('nan')) * 1e3:>9.3f} "
              f"{r.get('triton_over_limit', float('nan')):>7.1f} {r.get('binding_limit', '-'):>8} "
              f"{r.get('positions_equal_reference', float('nan')):>9.4f}")
    for r in rows:
        if r.get("sweep_s"):
            swept = ", ".join(f"S={ranges}: {seconds * 1e3:.3f} ms" for ranges, seconds in r["sweep_s"].items())
            print(f"L={r['L']:,} C={r['C']:,}: S={r['splits']}: {r['triton_s'] * 1e3:.3f} ms; {swept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
