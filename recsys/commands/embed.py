"""`muse embed --data DIR`: compute multimodal item embeddings (the Ray stage in pipelines/embed_items.py).

Local Ray with `--num-cpus` CPUs by default; a cluster when RAY_ADDRESS is set. Re-running on an
unchanged data folder does no model work; changed or new items are the only ones re-encoded.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from recsys.cli import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help="compute multimodal item embeddings (see docs/embeddings.md)")
    p.add_argument("--data", required=True, help="data folder with items.parquet, events.parquet and vocab/")
    p.add_argument("--config", help="YAML or JSON embedding config (see docs/embeddings.md); defaults otherwise")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (ignored with RAY_ADDRESS); default from config: 2")
    p.add_argument("--actors", type=int, help="actors per encoder pool (default from config: 1)")
    p.add_argument("--image", action="store_true", help="turn the image encoder on (reads the items' `image` paths)")
    p.add_argument("--force", action="store_true", help="ignore every cache and recompute everything")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from recsys.embed.config import ConfigError, EmbedConfig

    data = Path(args.data)
    if not data.is_dir():
        raise UserError(f"--data {data}: no such data folder (build one with `muse data ...`)")
    try:
        config = EmbedConfig.load(args.config) if args.config else EmbedConfig()
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if args.num_cpus is not None:
        config.ray.num_cpus = args.num_cpus
    if args.actors is not None:
        config.ray.actors = args.actors
    if args.image:
        config.image.enabled = True

    from pipelines.embed_items import embed_items

    summary = embed_items(data, config, force=args.force)
    print(json.dumps(summary, indent=2))
    return 0
