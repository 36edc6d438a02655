"""`muse store build|info --data DIR`: (re)build or describe a data folder's SequenceStore."""
from __future__ import annotations

import argparse
import json

import numpy as np

from recsys.paths import DataLayout


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("store", help="build or inspect the per-user SequenceStore")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="rebuild store/ from events.parquet and the folder's vocabularies")
    build.add_argument("--data", required=True, help="data folder")
    build.add_argument("--max-per-user", type=int, default=None, help="keep each user's most recent N behaviours")
    build.set_defaults(func=_build)
    info = actions.add_parser("info", help="print the store's counts and history-length percentiles as JSON")
    info.add_argument("--data", required=True, help="data folder")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    from recsys.data.folder import build_store

    store = build_store(DataLayout(args.data), max_per_user=args.max_per_user)
    print(json.dumps(store.meta))
    return 0


def _info(args: argparse.Namespace) -> int:
    from recsys.store.sequence_store import SequenceStore

    store = SequenceStore.open(DataLayout(args.data).store_dir)
    lengths = np.diff(store.offsets)[1:]
    percentiles = {f"p{q}": float(np.percentile(lengths, q)) if len(lengths) else 0.0 for q in (50, 90, 99)}
    print(json.dumps({"store": str(store.directory), **store.meta, "history_length": percentiles}))
    return 0
