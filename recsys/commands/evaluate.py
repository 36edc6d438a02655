"""`muse evaluate --data DIR --model-uri URI`: exact AUC / logloss / GAUC of a trained model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained model (AUC, logloss, exact GAUC)",
        description="Score the test half of the data folder's time split with a registered model "
        "(models:/NAME@ALIAS or models:/NAME/VERSION) or a model folder, and print the metrics.",
    )
    parser.add_argument("--data", required=True, help="data folder")
    parser.add_argument("--model-uri", required=True, help="models:/NAME@champion, models:/NAME/3 or a model folder")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else DATA/runs/mlflow.db)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="the split's test fraction (default 0.1)")
    parser.add_argument("--embedding-dtype", default="float16", help="which embeddings/table_<dtype> to use")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes building features")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the scoring process")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recsys.cli import UserError
    from recsys.models.io import load_feature_config, load_model_dir
    from recsys.paths import DataLayout
    from recsys.train.api import evaluate_on_split
    from recsys.train.registry import load_registered
    from recsys.train.tracking import resolve_tracking_uri

    layout = DataLayout(args.data)
    if args.model_uri.startswith("models:/"):
        model, feature_config, info = load_registered(args.model_uri, resolve_tracking_uri(layout, args.tracking_uri))
        label = f"{info['name']} v{info['version']}"
    else:
        folder = Path(args.model_uri)
        try:
            model, feature_config = load_model_dir(folder), load_feature_config(folder)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"--model-uri {folder}: {exc}") from None
        if feature_config is None:
            raise UserError(f"--model-uri {folder}: no features.json next to the model (save it with its FeatureConfig)")
        label = str(folder)
    report = evaluate_on_split(layout, model, feature_config, test_fraction=args.test_fraction,
                               embedding_dtype=args.embedding_dtype, batch_size=args.batch_size, num_workers=args.workers,
                               threads=args.threads)
    if args.json:
        print(json.dumps({"model": label, **report.to_dict()}))
    else:
        print(f"model: {label} ({model.config.variant})")
        print(report.table())
    return 0
