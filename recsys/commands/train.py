"""`muse train --data DIR --model NAME [--config FILE] [overrides]`: train, evaluate, track, register."""
from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("muse.train")

# CLI flag -> TrainConfig field (flags left unset keep the config file's / default value).
_OVERRIDES = {
    "model": "model",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "history_len": "history_len",
    "seed": "seed",
    "workers": "num_workers",
    "threads": "threads",
    "max_steps": "max_steps",
    "checkpoint_every": "checkpoint_every",
    "dense_lr": "dense_lr",
    "sparse_lr": "sparse_lr",
    "embedding_dtype": "embedding_dtype",
    "experiment": "experiment",
    "register_as": "registered_model",
    "promote_margin": "promote_margin",
    "warm_start": "warm_start",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a CTR model, tracked in MLflow",
        description="Train a CTR model on a data folder's time split, evaluate it (AUC, logloss, exact GAUC), "
        "log the run to MLflow and register the model (alias 'champion' if it beats the current one).",
    )
    parser.add_argument("--data", required=True, help="data folder (built by `muse data ...` and `muse embed`)")
    parser.add_argument("--model", help="din, sim-hard, sim-soft, muse, muse-no-simtier, muse-plain-ta (default: muse)")
    parser.add_argument("--config", help="YAML or JSON TrainConfig; flags below override its fields")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--history-len", type=int, help="longest history given to the GSU (default 1000)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int, help="DataLoader worker processes building features")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of the training process (default 1)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default: each epoch end)")
    parser.add_argument("--dense-lr", type=float)
    parser.add_argument("--sparse-lr", type=float)
    parser.add_argument("--embedding-dtype", help="which embeddings/table_<dtype> to use (default float16)")
    parser.add_argument("--experiment", help="MLflow experiment name (default muse-ctr)")
    parser.add_argument("--register-as", help="registered model name (default muse-ctr; '' = do not register)")
    parser.add_argument("--promote-margin", type=float, help="GAUC margin a new version needs to become champion")
    parser.add_argument("--warm-start", help="model folder or models:/NAME@ALIAS to start from")
    parser.add_argument("--out", help="checkpoint/model folder (default DATA/training/<model>-seed<seed>)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else DATA/runs/mlflow.db)")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow or register")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recsys.paths import DataLayout
    from recsys.train.api import train_model
    from recsys.train.config import TrainConfig
    from recsys.train.trainer import TrainingDiverged

    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    config = config.replace(**{field: getattr(args, flag) for flag, field in _OVERRIDES.items()})
    try:
        result = train_model(DataLayout(args.data), config, out_dir=args.out, resume=args.resume,
                             tracking_uri=args.tracking_uri, track=not args.no_track)
    except TrainingDiverged as exc:
        log.error("%s", exc)
        return 1
    if args.json:
        print(json.dumps({"model_dir": str(result.model_dir), "run_id": result.run_id, "version": result.version,
                          "promoted": result.promoted, "metrics": result.metrics, "report": result.report.to_dict()}))
        return 0
    print(result.report.table())
    print()
    print(f"model folder: {result.model_dir}")
    print(f"training throughput: {result.metrics['train_samples_per_s']:,.0f} samples/s")
    if result.run_id:
        print(f"MLflow run: {result.run_id}")
    if result.version:
        status = "now champion" if result.promoted else "champion unchanged"
        print(f"registered: models:/{config.registered_model}/{result.version} ({status})")
    return 0
