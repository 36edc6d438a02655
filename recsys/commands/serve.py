"""`muse serve --data DIR --model-uri models:/muse@champion`: run the online ranking service.

Under uvicorn by default; `--ray` runs the same app as a Ray Serve deployment with replicas.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recsys.cli import UserError

log = logging.getLogger("muse.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the online ranking service (see docs/serving.md)")
    p.add_argument("--data", required=True, help="data folder: vocabularies, SequenceStore, embedding table")
    p.add_argument("--model-uri", default="models:/muse@champion",
                   help="models:/NAME@ALIAS (hot-reloaded when the alias moves), models:/NAME/VERSION, "
                        "or a saved model folder (default: %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow registry (default: MLFLOW_TRACKING_URI, else DATA/runs/mlflow.db)")
    p.add_argument("--table-dtype", default="float16", choices=["float32", "float16", "bfloat16", "int8"],
                   help="which embeddings/table_<dtype> to serve with (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--max-candidates", type=int, default=1000, help="candidates per request, at most (422 above)")
    p.add_argument("--timeout-ms", type=float, default=1000.0, help="deadline of one ranking (504 after)")
    p.add_argument("--max-concurrency", type=int, default=8, help="rankings in flight, at most (503 above)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size, at most (413 above)")
    p.add_argument("--threads", type=int, default=1,
                   help="scoring threads, each using torch's intra-op parallelism (default: %(default)s)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads per scoring thread (default: CPUs / scoring threads)")
    p.add_argument("--poll-s", type=float, default=30.0,
                   help="seconds between registry alias checks; 0 turns hot reload off (default: %(default)s)")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment instead of plain uvicorn")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (with --ray)")
    p.set_defaults(func=_serve)


def _settings(args: argparse.Namespace):
    from recsys.serving.app import ServeSettings

    try:
        return ServeSettings(
            max_candidates=args.max_candidates,
            timeout_ms=args.timeout_ms,
            max_concurrency=args.max_concurrency,
            max_body_bytes=args.max_body_bytes,
            scoring_threads=args.threads,
            torch_threads=args.torch_threads,
        )
    except ValueError as exc:
        raise UserError(f"muse serve: {exc}") from None


def _serve(args: argparse.Namespace) -> int:
    if not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: not a folder")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be in 1..65535")
    if args.poll_s < 0:
        raise UserError(f"--poll-s {args.poll_s}: must be >= 0")
    settings = _settings(args)
    if args.ray:
        return _serve_ray(args, settings)
    import uvicorn

    from recsys.serving.service import serving_app

    app = serving_app(args.model_uri, args.data, settings, tracking_uri=args.tracking_uri,
                      table_dtype=args.table_dtype, poll_interval_s=args.poll_s)
    log.info("serving %s on http://%s:%d (POST /rank, GET /healthz /readyz /metrics)", args.model_uri, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info")
    return 0


def _serve_ray(args: argparse.Namespace, settings) -> int:
    import ray

    from recsys.serving.ray_app import ranker_application, run_on_ray

    if args.replicas < 1:
        raise UserError(f"--replicas {args.replicas}: must be >= 1")
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    application = ranker_application(
        args.model_uri, args.data, settings, replicas=args.replicas, tracking_uri=args.tracking_uri,
        table_dtype=args.table_dtype, poll_interval_s=args.poll_s,
    )
    log.info("serving %s with %d Ray Serve replica(s) on http://%s:%d", args.model_uri, args.replicas, args.host, args.port)
    run_on_ray(application, args.host, args.port, blocking=True)
    return 0
