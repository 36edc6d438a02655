"""The `muse` command.

Each sub-command group lives in its own module under `recsys/commands/` (or `pipelines/`),
exposing `register(subparsers)`; modules are imported only when their group is used, so
`muse data ...` never pays for importing Ray or MLflow.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Defined outside this module so `python -m recsys.cli` catches the same class the commands raise.
from recsys.errors import UserError

# group name -> (module path, one-line help)
COMMAND_GROUPS: dict[str, tuple[str, str]] = {
    "data": ("recsys.commands.data", "build contract tables from a source (movielens, taobao-mm, events, synthetic)"),
    "store": ("recsys.commands.store", "build or inspect the per-user SequenceStore"),
    "embed": ("recsys.commands.embed", "compute multimodal item embeddings (Ray stage)"),
    "similar": ("recsys.commands.similar", "print an item's nearest neighbours by embedding"),
    "train": ("recsys.commands.train", "train a CTR model, tracked in MLflow"),
    "evaluate": ("recsys.commands.evaluate", "evaluate a trained model (AUC, logloss, exact GAUC)"),
    "serve": ("recsys.commands.serve", "run the online ranking service"),
    "pipeline": ("pipelines.cli", "run, backfill and inspect the daily batch pipeline"),
    "demo": ("recsys.commands.demo", "the end-to-end path on MovieLens-100K"),
}


def build_parser(group: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse", description="MUSE recommender pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND")
    for name, (module_path, help_text) in COMMAND_GROUPS.items():
        if name == group:
            module = importlib.import_module(module_path)
            module.register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    group = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(group if group in COMMAND_GROUPS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.group is None else 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        logging.getLogger("muse").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
