"""CTR benchmark: every model variant on MovieLens-100K and on a synthetic long-history set.

For each data set, variant and seed, trains with `recsys.train.train_model` on the time split
(last 10% of each user's impressions are test), evaluates exact GAUC / AUC / logloss, and reports
mean and std over seeds. Then measures MUSE training throughput (samples/s, feature building in
one DataLoader worker + training in the main process: 2 cores) at history lengths 1,000, 10,000
and 100,000, on one synthetic folder whose users all have 100,000 behaviours, side by side in one run.

Writes benchmarks/results/ctr.json, prints a table and logs a summary run to MLflow
(experiment "ctr-benchmark" in DATA_ROOT/runs/mlflow.db unless MLFLOW_TRACKING_URI is set).

    python benchmarks/ctr.py                    # full: 6 variants x 2 data sets x 3 seeds
    python benchmarks/ctr.py --quick            # 1 seed, capped steps, small synthetic set
    python benchmarks/ctr.py --quick --datasets # training throughput only

MovieLens-100K needs multimodal embeddings for the muse variants: the script runs
`muse embed --data DATA_ROOT/movielens` once if the folder has no embedding table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recsys.data import synthetic  # noqa: E402
from recsys.data.folder import is_complete  # noqa: E402
from recsys.data.movielens import load_movielens  # noqa: E402
from recsys.paths import DataLayout  # noqa: E402
from recsys.train import tracking  # noqa: E402
from recsys.train.api import train_model  # noqa: E402
from recsys.train.config import TrainConfig  # noqa: E402

log = logging.getLogger("benchmarks.ctr")

VARIANTS = ("din", "sim-hard", "sim-soft", "muse", "muse-no-simtier", "muse-plain-ta")
METRICS = ("gauc", "auc", "logloss")


@dataclasses.dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...]
    epochs: int
    max_steps: int
    synthetic: synthetic.SyntheticConfig
    throughput_users: int
    throughput_steps: int


FULL = Plan(
    seeds=(0, 1, 2),
    epochs=1,
    max_steps=0,
    synthetic=synthetic.SyntheticConfig(users=2_000, history_len=1_000, items=20_000, impressions_per_user=20, seed=7),
    throughput_users=400,
    throughput_steps=40,
)
QUICK = Plan(
    seeds=(0,),
    epochs=1,
    max_steps=60,
    synthetic=synthetic.SyntheticConfig(users=300, history_len=1_000, items=5_000, impressions_per_user=20, seed=7),
    throughput_users=100,
    throughput_steps=10,
)


def movielens_folder(root: Path, embeddings: bool) -> DataLayout:
    layout = load_movielens(root / "movielens")
    if embeddings and not layout.embedding_table("float16").exists():
        log.info("computing MovieLens item embeddings (muse embed)")
        subprocess.run([sys.executable, "-m", "recsys.cli", "embed", "--data", str(layout.root)], check=True)
    return layout


def synthetic_folder(root: Path, config: synthetic.SyntheticConfig) -> DataLayout:
    name = f"synthetic-u{config.users}-h{config.history_len}-i{config.items}-s{config.seed}"
    layout = DataLayout(root / name)
    if not (is_complete(layout) and layout.embedding_table("float16").exists()):
        log.info("generating %s", name)
        synthetic.write(config, layout.root)
    return layout


def accuracy(layouts: dict[str, DataLayout], variants: tuple[str, ...], plan: Plan, out_root: Path) -> dict:
    """{data set: {variant: {metric: {mean, std, values}}}} over the plan's seeds."""
    results: dict = {}
    for data_name, layout in layouts.items():
        for variant in variants:
            runs = []
            for seed in plan.seeds:
                config = TrainConfig(model=variant, seed=seed, epochs=plan.epochs, max_steps=plan.max_steps,
                                     num_workers=1, registered_model="")
                started = time.perf_counter()
                result = train_model(layout, config, out_dir=out_root / data_name / f"{variant}-seed{seed}",
                                     track=False, progress=False)
                runs.append(result.metrics)
                log.info("%s %s seed %d: GAUC %.4f AUC %.4f logloss %.4f (%.0f s)", data_name, variant, seed,
                         result.metrics["gauc"], result.metrics["auc"], result.metrics["logloss"],
                         time.perf_counter() - started)
            summary = {}
            for metric in (*METRICS, "train_samples_per_s"):
                values = [float(r[metric]) for r in runs]
                summary[metric] = {"mean": float(np.mean(values)),
                                   "std": float(np.std(values, ddof=1)) if len(values) > 1 else None, "values": values}
            summary["test_samples"] = int(runs[0]["samples"])
            results.setdefault(data_name, {})[variant] = summary
    return results


def throughput(root: Path, plan: Plan, out_root: Path, lengths: tuple[int, ...]) -> dict:
    """MUSE training samples/s at each history length, on one synthetic folder as long as the longest.

    Users are capped so the folder holds at most 10M behaviours (100 users at 100,000).
    """
    longest = max(lengths)
    users = min(plan.throughput_users, max(10, 10_000_000 // longest))
    config = synthetic.SyntheticConfig(users=users, history_len=longest, items=20_000,
                                       impressions_per_user=40, seed=11)
    layout = synthetic_folder(root, config)
    out = {}
    for history_len in lengths:
        train = TrainConfig(model="muse", history_len=history_len, max_steps=plan.throughput_steps, num_workers=1,
                            registered_model="", eval_batch_size=256)
        result = train_model(layout, train, out_dir=out_root / "throughput" / f"h{history_len}", track=False, progress=False)
        out[str(history_len)] = {"samples_per_s": result.metrics["train_samples_per_s"], "steps": plan.throughput_steps,
                                 "batch_size": train.batch_size, "users": users}
        log.info("throughput at history %d: %.0f samples/s", history_len, result.metrics["train_samples_per_s"])
    return out


def table(results: dict) -> str:
    lines = [f"{'data':<12} {'model':<16} {'GAUC':>16} {'AUC':>16} {'logloss':>16}"]
    for data_name, per_variant in results.items():
        for variant, summary in per_variant.items():
            cells = [f"{summary[m]['mean']:.4f} ± {summary[m]['std']:.4f}" if summary[m]["std"] is not None
                     else f"{summary[m]['mean']:.4f} (1 seed)" for m in METRICS]
            lines.append(f"{data_name:<12} {variant:<16} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, capped steps, small synthetic set")
    parser.add_argument("--data-root", default=os.environ.get("MUSE_BENCH_DATA", str(REPO / "data" / "bench")),
                        help="where data folders and trained models go (default data/bench/, git-ignored)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the mode's seeds (full: 0 1 2, quick: 0)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--datasets", nargs="*", default=["movielens", "synthetic"], choices=["movielens", "synthetic"],
                        help="data sets for the accuracy runs (none: throughput only)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--throughput-lengths", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                        help="history lengths of the MUSE training throughput runs")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ctr.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    plan = QUICK if args.quick else FULL
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(args.seeds))
    root = Path(args.data_root)
    out_root = root / ("bench-quick" if args.quick else "bench")

    started = time.perf_counter()
    layouts = {}
    if "movielens" in args.datasets:
        layouts["movielens"] = movielens_folder(root, any(v.startswith("muse") for v in args.variants))
    if "synthetic" in args.datasets:
        layouts["synthetic"] = synthetic_folder(root, plan.synthetic)
    results = accuracy(layouts, tuple(args.variants), plan, out_root)
    speed = None if args.skip_throughput else throughput(root, plan, out_root, tuple(args.throughput_lengths))

    report = {
        "command": " ".join(["python", "benchmarks/ctr.py", *(argv if argv is not None else sys.argv[1:])]),
        "mode": "quick" if args.quick else "full",
        "seeds": list(plan.seeds),
        "epochs": plan.epochs,
        "max_steps": plan.max_steps,
        "split": "time-based: last floor(10%) of each user's impressions by ts are test",
        "synthetic_config": dataclasses.asdict(plan.synthetic),
        "defaults": dataclasses.asdict(TrainConfig()),
        "results": results,
        "throughput_muse": speed,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": _torch_threads()},
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)

    print(table(results))
    if speed:
        print("\nMUSE training throughput: " + "; ".join(
            f"{run['samples_per_s']:,.1f} samples/s at history {int(length):,}" for length, run in speed.items()))
    print(f"\nwritten {out}")
    _log_to_mlflow(root, report, out)
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _log_to_mlflow(root: Path, report: dict, json_path: Path) -> None:
    uri = tracking.resolve_tracking_uri(DataLayout(root), None)
    with tracking.start_run(uri, "ctr-benchmark", run_name=f"ctr-{report['mode']}") as run:
        run.params({"mode": report["mode"], "seeds": report["seeds"], "epochs": report["epochs"], "max_steps": report["max_steps"]})
        flat = {}
        for data_name, per_variant in report["results"].items():
            for variant, summary in per_variant.items():
                for metric in METRICS:
                    flat[f"{data_name}.{variant}.{metric}_mean"] = summary[metric]["mean"]
                    if summary[metric]["std"] is not None:
                        flat[f"{data_name}.{variant}.{metric}_std"] = summary[metric]["std"]
        if report["throughput_muse"]:
            for length, speed in report["throughput_muse"].items():
                flat[f"throughput.muse.h{length}_samples_per_s"] = speed["samples_per_s"]
        run.metrics(flat)
        import mlflow

        mlflow.log_artifact(str(json_path))
    print(f"MLflow: experiment ctr-benchmark at {uri}")


if __name__ == "__main__":
    sys.exit(main())
