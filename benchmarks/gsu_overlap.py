"""Why the GSU's fused CPU screen stays above the machine bound: its memory traffic and its tile
products do not overlap on this CPU.

Builds benchmarks/gsu_overlap.c (a C compiler and an AMX-BF16 CPU are needed) and runs, on one
core, the screen's own pattern without its selection: 100,000 random 256-byte rows of a 1M-row
bf16 table gathered and transposed 32 at a time, and AMX tile products of every group against
the candidates. It times the gather alone, the tile products alone and both interleaved, and,
as a control, vector FMAs alone and between the tile products. From the same run:

    hidden = (gather + tiles - both) / min(gather, tiles)
        the share of the shorter part that runs in the shadow of the other: 1.0 when it is
        hidden completely, 0 when the two add up, below 0 when together they take even longer;
    fma hidden = (fma + tiles - fma_tiles) / min(fma, tiles), the same for plain arithmetic;
    prefetch hidden = (prefetch + tiles - prefetch_tiles) / min(prefetch, tiles): the prefetches
        alone (no gather loads) between the tile products;
    products hidden = (prefetch + products - prefetch_products) / min(prefetch, products): the
        same with the operand tiles loaded once per unit instead of before every product;
    loads hidden = (prefetch + loads - loads_prefetch) / min(prefetch, loads): the tile loads of
        every product without the products, against the prefetches: whether the loads are what waits;
    small hidden = (prefetch + small - small_prefetch) / min(prefetch, small): the same tile loads
        as `prefetch hidden`, every unit's candidates from the first two tiles (8 KiB, in L1): the
        control that tells the number of tile loads from the L1 misses of a larger candidate set;
    int8 speedup = both / int8: the same pass on the int8 copy of the table (128-byte rows, AMX-INT8
        products of 64 dims a tile: half the bytes and half the tile products).

    python benchmarks/gsu_overlap.py                 # 128 candidates, 10 repeats
    python benchmarks/gsu_overlap.py --candidates 1024

Prints JSON and writes it to benchmarks/results/gsu_overlap.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from kernels import native

SOURCE = Path(__file__).resolve().with_name("gsu_overlap.c")
RESULTS = Path(__file__).resolve().parent / "results" / "gsu_overlap.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=128, help="candidates, rounded up to a multiple of 32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--fma-steps", type=int, default=24, help="FMA rounds after each pair of candidate tiles")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "gsu_overlap"
        flags = [flag for flag in native._FLAGS if flag not in ("-fPIC", "-shared")]  # the screen's own
        subprocess.run([os.environ.get("CC", "cc"), *flags, "-o", str(binary), str(SOURCE)], check=True)
        tiles = -(-args.candidates // 16)
        out = subprocess.run([str(binary), str(tiles), str(args.repeats), str(args.fma_steps)],
                             check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["hidden"] = (result["gather_s"] + result["tiles_s"] - result["both_s"]) / min(result["gather_s"], result["tiles_s"])
    for name, (alone, other, together) in {
        "fma_hidden": ("fma", "tiles", "fma_tiles"),
        "prefetch_hidden": ("prefetch", "tiles", "prefetch_tiles"),
        "products_hidden": ("prefetch", "products", "prefetch_products"),
        "loads_hidden": ("prefetch", "loads", "loads_prefetch"),
        "small_hidden": ("prefetch", "small", "small_prefetch"),
    }.items():
        first, second = result[f"{alone}_s"], result[f"{other}_s"]
        result[name] = (first + second - result[f"{together}_s"]) / min(first, second)
    result["int8_speedup"] = result["both_s"] / result["int8_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as tmp_file:
        json.dump(result, tmp_file, indent=2)
    os.replace(tmp_file.name, args.out)
    print(json.dumps(result, indent=2))
    ms = {key[:-2]: value * 1e3 for key, value in result.items() if key.endswith("_s")}
    print(f"\none core, {result['rows']:,} rows x {result['candidates']} candidates (ms): gather {ms['gather']:.2f}, "
          f"tile products {ms['tiles']:.2f}, both interleaved {ms['both']:.2f} -> hidden {result['hidden']:.2f} "
          f"(1 = the shorter hides behind the other, 0 = they add up, < 0 = worse than adding up)")
    print(f"control: FMAs {ms['fma']:.2f}, tile products {ms['tiles']:.2f}, FMAs between them {ms['fma_tiles']:.2f} "
          f"-> hidden {result['fma_hidden']:.2f}")
    print(f"memory requests alone: prefetches {ms['prefetch']:.2f}, between the tile products {ms['prefetch_tiles']:.2f} "
          f"-> hidden {result['prefetch_hidden']:.2f}; products with their operands loaded once per unit "
          f"{ms['products']:.2f}, with the prefetches {ms['prefetch_products']:.2f} -> hidden {result['products_hidden']:.2f}; "
          f"the tile loads without the products {ms['loads']:.2f}, with the prefetches {ms['loads_prefetch']:.2f} "
          f"-> hidden {result['loads_hidden']:.2f}; "
          f"the same tile loads from 8 KiB of candidates {ms['small']:.2f}, with the prefetches {ms['small_prefetch']:.2f} "
          f"-> hidden {result['small_hidden']:.2f}")
    print(f"int8 copy: gather {ms['int8_gather']:.2f}, gather and tile products interleaved {ms['int8']:.2f} "
          f"-> {result['int8_speedup']:.2f}x faster than the bf16 pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
