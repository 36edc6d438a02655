"""Serving latency and load benchmark; prints JSON and writes benchmarks/results/serving.json.

Measures, on one synthetic data folder whose users each have 100,000 behaviours:

1. in-process `Ranker.score` latency (p50 / p99 / mean) for histories cut to 1,000 / 10,000 /
   100,000 behaviours x 100 / 1,000 candidates, with the mean share of time spent in history
   fetch, GSU and ESU;
2. the same cases over HTTP (`muse serve` under uvicorn in a child process, one client, loopback);
3. a load test on the 100,000 x 100 case: concurrent clients for a bounded time at levels up to
   the server's concurrency bound (errors must be 0), and one level above it (503s expected).

The model is freshly initialised (scores are meaningless, cost is that of a trained model of
the same shape) unless --model-uri names a trained one. Only 127.0.0.1 is ever contacted.

    python benchmarks/serving.py                 # full run (30 s budget per case, 10 s per load level)
    python benchmarks/serving.py --quick         # 8 s per case, 4 s per load level
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from recsys.data import synthetic
from recsys.features import FeatureConfig, FeatureMap
from recsys.models.io import save_model
from recsys.models.muse import ModelConfig, MuseModel
from recsys.paths import DataLayout
from recsys.serving.ranker import Ranker

log = logging.getLogger("bench.serving")

HISTORY_LENGTHS = (1_000, 10_000, 100_000)
CANDIDATE_COUNTS = (100, 1_000)
TARGET = {"history": 100_000, "candidates": 100, "p99_ms": 50.0}
MAX_CONCURRENCY = 8
RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    values = np.asarray(samples_ms)
    return {
        "n": int(values.size),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(float(values.mean()), 3),
    }


def repeats_for(history: int, candidates: int, quick: bool) -> int:
    """More calls for cheap cases (a p99 from 30 samples is the maximum), fewer for slow ones."""
    base = 200 if history * candidates <= 1_000_000 else 100 if history * candidates <= 10_000_000 else 40
    return max(10, base // 4) if quick else base


def timed_calls(call, repeats: int, budget_s: float, minimum: int = 5) -> list:
    """Results of `call()` repeated `repeats` times, or fewer (>= minimum) once `budget_s` is spent."""
    results, deadline = [], time.perf_counter() + budget_s
    while len(results) < repeats and (len(results) < minimum or time.perf_counter() < deadline):
        results.append(call())
    return results


# ---------------------------------------------------------------------- setup


def build_data(work: Path, users: int, items: int) -> DataLayout:
    root = work / "data"
    if (root / "store" / "meta.json").exists() and (root / "embeddings" / "table_float16" / "meta.json").exists():
        log.info("reusing the data folder %s", root)
        return DataLayout(root)
    config = synthetic.SyntheticConfig(users=users, history_len=max(HISTORY_LENGTHS), items=items, dim=128,
                                       impressions_per_user=1, seed=0)
    log.info("generating %d users x %d behaviours over %d items (128-d embeddings)", users, config.history_len, items)
    return synthetic.write(config, root)


def prepare_models(layout: DataLayout, work: Path, model_uri: str | None) -> tuple[dict[int, Path], dict]:
    """One model folder per history length: the same weights, with long_len = that length.

    Returns the folders and a description of the model for the result.
    """
    if model_uri is None:
        torch.manual_seed(0)
        config = ModelConfig.from_feature_map(FeatureMap.from_layout(layout), variant="muse")
        model, base_features = MuseModel(config), None
        description = "freshly initialised MuseModel (variant muse, default ModelConfig; not trained)"
    else:
        source = Ranker.load(model_uri, layout.root)
        model, base_features = source.model, source.feature_config
        description = f"trained model {model_uri} (version {source.version})"
    dirs = {}
    for length in HISTORY_LENGTHS:
        features = (FeatureConfig.for_model(model.config, long_len=length) if base_features is None
                    else FeatureConfig.from_dict({**base_features.to_dict(), "long_len": length}))
        dirs[length] = save_model(model, work / "models" / f"history-{length}", features)
    shape = {k: model.config.to_dict()[k] for k in ("variant", "id_dim", "mm_dim", "attention_dim", "tower_hidden")}
    return dirs, {"description": description, "config": shape, "parameters": sum(p.numel() for p in model.parameters())}


def request_stream(layout: DataLayout, candidates: int, seed: int):
    """Endless (user_id, candidate ids) pairs: users in turn, candidates drawn from the catalogue."""
    rng = np.random.default_rng(seed)
    users = _vocab_keys(layout, "user_id")
    items = _vocab_keys(layout, "item_id")
    i = 0
    while True:
        yield int(users[i % len(users)]), rng.choice(items, candidates, replace=False).tolist()
        i += 1


def _vocab_keys(layout: DataLayout, name: str) -> np.ndarray:
    from recsys.data.vocab import Vocab

    return Vocab.load(layout.vocab(name)).keys


# ---------------------------------------------------------------------- in-process


def bench_in_process(layout: DataLayout, model_dirs: dict[int, Path], counts: list[int], quick: bool,
                     budget_s: float) -> list[dict]:
    results = []
    for length, model_dir in model_dirs.items():
        ranker = Ranker.load(str(model_dir), layout.root)
        for count in counts:
            stream = request_stream(layout, count, seed=length + count)
            for _ in range(2):
                ranker.score(*next(stream))
            timings = timed_calls(lambda: ranker.score(*next(stream)).timings, repeats_for(length, count, quick), budget_s)
            totals = [t.total_ms for t in timings]
            stages = np.array([(t.history_ms, t.gsu_ms, t.esu_ms) for t in timings]).sum(0)
            share = stages / stages.sum()
            row = {"history": length, "candidates": count, **percentiles(totals),
                   "share": {"history": round(float(share[0]), 3), "gsu": round(float(share[1]), 3),
                             "esu": round(float(share[2]), 3)},
                   "stage_mean_ms": {k: round(float(v / len(totals)), 3) for k, v in zip(("history", "gsu", "esu"), stages)}}
            log.info("in-process %s", row)
            results.append(row)
        del ranker
    return results


# ---------------------------------------------------------------------- HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`muse serve` in a child process on 127.0.0.1, stopped on exit."""

    def __init__(self, layout: DataLayout, model_dir: Path, scoring_threads: int, torch_threads: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "recsys.cli", "serve", "--data", str(layout.root), "--model-uri", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(self.port), "--max-candidates", str(max(CANDIDATE_COUNTS)),
                   "--max-concurrency", str(MAX_CONCURRENCY), "--timeout-ms", "10000", "--threads", str(scoring_threads),
                   "--torch-threads", str(torch_threads),
                   "--poll-s", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready in 180 s")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def bench_http(layout: DataLayout, server: Server, length: int, counts: list[int], quick: bool,
               budget_s: float) -> list[dict]:
    results = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for count in counts:
            stream = request_stream(layout, count, seed=length + count + 1)
            for _ in range(2):
                user, items = next(stream)
                client.post("/rank", json={"user_id": user, "candidates": items}).raise_for_status()

            def call() -> tuple[float, float]:
                user, items = next(stream)
                started = time.perf_counter()
                response = client.post("/rank", json={"user_id": user, "candidates": items})
                elapsed = (time.perf_counter() - started) * 1000.0
                response.raise_for_status()
                return elapsed, response.json()["timings_ms"]["total"]

            pairs = timed_calls(call, repeats_for(length, count, quick), budget_s)
            latencies, server_side = [p[0] for p in pairs], [p[1] for p in pairs]
            row = {"history": length, "candidates": count, **percentiles(latencies),
                   "scoring_p50_ms": round(float(np.percentile(server_side, 50)), 3)}
            log.info("http %s", row)
            results.append(row)
    return results


async def _load_level(url: str, layout: DataLayout, clients: int, seconds: float, count: int) -> dict:
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(seed: int, client: httpx.AsyncClient) -> None:
        stream = request_stream(layout, count, seed)
        while time.perf_counter() < deadline:
            user, items = next(stream)
            started = time.perf_counter()
            try:
                response = await client.post("/rank", json={"user_id": user, "candidates": items})
                key = str(response.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if key == "200":
                latencies.append((time.perf_counter() - started) * 1000.0)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(1000 + i, client) for i in range(clients)))
    elapsed = time.perf_counter() - started
    ok = statuses.get("200", 0)
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "ok": ok,
        "throughput_rps": round(ok / elapsed, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
        "errors": sum(n for k, n in statuses.items() if k != "200"),
        "statuses": statuses,
        "within_bound": clients <= MAX_CONCURRENCY,
    }


def bench_load(layout: DataLayout, server: Server, quick: bool, count: int) -> list[dict]:
    seconds = 4.0 if quick else 10.0
    levels = (1, 2, 4, MAX_CONCURRENCY, 2 * MAX_CONCURRENCY)
    results = []
    for clients in levels:
        row = asyncio.run(_load_level(server.url, layout, clients, seconds, count))
        log.info("load %s", row)
        results.append(row)
    return results


# ---------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a shorter load test")
    parser.add_argument("--users", type=int, default=16, help="synthetic users (each with 100,000 behaviours)")
    parser.add_argument("--items", type=int, default=200_000, help="synthetic catalogue size")
    parser.add_argument("--model-uri", help="benchmark this trained model instead of a freshly initialised one")
    parser.add_argument("--work-dir", help="keep data and models here (reused on the next run)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (in-process and per server scoring thread)")
    parser.add_argument("--scoring-threads", type=int, default=1, help="the server's scoring threads (muse serve --threads)")
    parser.add_argument("--histories", type=int, nargs="+", default=list(HISTORY_LENGTHS), choices=HISTORY_LENGTHS,
                        help="history lengths to measure (default: all)")
    parser.add_argument("--candidates", type=int, nargs="+", default=list(CANDIDATE_COUNTS), choices=CANDIDATE_COUNTS,
                        help="candidate counts to measure (default: all)")
    parser.add_argument("--case-seconds", type=float, default=None,
                        help="time budget per measured case, at least 5 calls (default: 30, 8 with --quick)")
    parser.add_argument("--out", default=str(RESULTS), help="result JSON path (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="muse-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        layout = build_data(work, args.users, args.items)
        model_dirs, model_info = prepare_models(layout, work, args.model_uri)
        model_dirs = {length: path for length, path in model_dirs.items() if length in args.histories}
        budget_s = args.case_seconds or (8.0 if args.quick else 30.0)
        in_process = bench_in_process(layout, model_dirs, args.candidates, args.quick, budget_s)
        http, load = [], []
        for length, model_dir in model_dirs.items():
            with Server(layout, model_dir, args.scoring_threads, args.threads) as server:
                http += bench_http(layout, server, length, args.candidates, args.quick, budget_s)
                if length == max(args.histories):
                    load = bench_load(layout, server, args.quick, min(args.candidates))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    target_row = next((r for r in in_process
                       if r["history"] == TARGET["history"] and r["candidates"] == TARGET["candidates"]), None)
    result = {
        "benchmark": "serving",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "server_scoring_threads": args.scoring_threads, "torch": torch.__version__,
                    "note": "cores shared with other work while measuring unless rerun on an idle machine"},
        "model": model_info,
        "features": {"short_len": 50, "k": 50, "gsu_policy": "muse", "embedding_table": "float16, 128-d"},
        "data": {"users": args.users, "behaviours_per_user": max(HISTORY_LENGTHS), "items": args.items, "source": "recsys.data.synthetic"},
        "in_process": in_process,
        "http": http,
        "load_test": {"history": max(args.histories), "candidates": min(args.candidates),
                      "server_max_concurrency": MAX_CONCURRENCY, "levels": load},
        "target": {**TARGET, "measured_p99_ms": None if target_row is None else target_row["p99_ms"],
                   "met": None if target_row is None else target_row["p99_ms"] < TARGET["p99_ms"]},
        "errors_below_bound": sum(r["errors"] for r in load if r["within_bound"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
