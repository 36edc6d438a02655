"""benchmarks/gsu_gpu.py, the GPU timing script of the Triton kernel, checked where no GPU is:
its smoke config runs the kernel (on the interpreter here) against the reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gsu_gpu.py"


def test_the_gpu_benchmark_runs_its_smoke_config_and_matches_the_reference(tmp_path):
    out = tmp_path / "gsu_gpu.json"
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], check=True, capture_output=True,
                   text=True, env=env, timeout=300)
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert (row["L"], row["C"], row["splits"]) == (40, 3, 2)  # two history ranges, merged
    assert list(row["sweep_s"]) == ["1"] and row["sweep_s"]["1"] > 0  # and one, side by side
    assert row["positions_equal_reference"] == 1.0
    assert row["triton_s"] > 0 and row["flops"] == 2.0 * row["B"] * 3 * 40 * 16
