"""`muse data ...`: build a data folder (contract tables, vocabularies, store) from a source."""
from __future__ import annotations

import argparse
import json

from recsys.paths import DataLayout


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="build contract tables from a source (see docs/foundation.md)")
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)

    ml = sources.add_parser("movielens", help="MovieLens-100K (real data, from the recbole 1.2.1 wheel on PyPI)")
    ml.add_argument("--out", required=True, help="data folder to write")
    ml.add_argument("--wheel", help="a local recbole-1.2.1 wheel instead of downloading it")
    ml.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    ml.set_defaults(func=_movielens)

    syn = sources.add_parser("synthetic", help="generated lifelong histories (deterministic; scales to 100K per user)")
    syn.add_argument("--out", required=True, help="data folder to write")
    syn.add_argument("--users", type=int, help="number of users (default 1000)")
    syn.add_argument("--history-len", type=int, help="behaviours per user before the start date (default 1000)")
    syn.add_argument("--items", type=int, help="number of items (default 50000)")
    syn.add_argument("--topics", type=int, help="latent topics (default 64)")
    syn.add_argument("--dim", type=int, help="content vector dimension (default 64)")
    syn.add_argument("--impressions-per-user", type=int, help="labelled impressions per user (default 20)")
    syn.add_argument("--history-days", type=int, help="days the history spans before the start date (default 365)")
    syn.add_argument("--days", type=int, help="daily partitions after the start date (default 0)")
    syn.add_argument("--start-date", help="first daily partition, YYYY-MM-DD (default 2026-01-01)")
    syn.add_argument("--daily-events-per-user", type=int, help="behaviours per user per day (default 10)")
    syn.add_argument("--daily-impressions-per-user", type=int, help="impressions per user per day (default 10)")
    syn.add_argument("--seed", type=int, help="random seed (default 0)")
    syn.set_defaults(func=_synthetic)

    tb = sources.add_parser("taobao-mm", help="the public TAOBAO-MM Parquet files (MUSE paper data)")
    tb.add_argument("--src", required=True, help="folder holding the TAOBAO-MM Parquet files (layout: docs/foundation.md)")
    tb.add_argument("--out", required=True, help="data folder to write")
    tb.add_argument("--max-per-user", type=int, help="keep each user's most recent N behaviours in the store")
    tb.set_defaults(func=_taobao_mm)

    imp = sources.add_parser("import-events", help="your own CSV/Parquet log, by column mapping")
    imp.add_argument("file", help="the interaction log (.csv, .tsv or .parquet)")
    imp.add_argument("--out", required=True, help="data folder to write")
    imp.add_argument("--user-col", required=True, help="column with the user id (integer or text)")
    imp.add_argument("--item-col", required=True, help="column with the item id (integer or text)")
    imp.add_argument("--ts-col", required=True, help="column with the time (seconds, datetime or ISO text)")
    imp.add_argument("--ts-unit", default="s", choices=["s", "ms", "us"], help="unit of an integer time column")
    imp.add_argument("--label-col", help="0/1 click column: rows become labelled impressions")
    imp.add_argument("--history", default="positives", choices=["positives", "all"],
                     help="with --label-col, which rows form the behaviour history (default: positives)")
    imp.add_argument("--items", help="item catalogue (.csv, .tsv or .parquet)")
    imp.add_argument("--item-id-col", default="item_id", help="item id column of --items")
    imp.add_argument("--category-col", default="category_id", help="category column of --items")
    imp.add_argument("--title-col", default="title", help="title column of --items")
    imp.set_defaults(func=_import_events)


def _summary(layout: DataLayout) -> int:
    from recsys.store.sequence_store import SequenceStore

    store = SequenceStore.open(layout.store_dir)
    print(json.dumps({"data": str(layout.root), **{k: store.meta[k] for k in
                      ("num_users", "num_items", "num_categories", "num_behaviours", "longest_history")}}))
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from recsys.data.movielens import load_movielens

    return _summary(load_movielens(args.out, wheel=args.wheel, force=args.force))


def _synthetic(args: argparse.Namespace) -> int:
    from recsys.data import synthetic

    config = synthetic.config_from_args(**vars(args))
    return _summary(synthetic.write(config, args.out))


def _import_events(args: argparse.Namespace) -> int:
    from recsys.data.events import EventMapping, ItemMapping, import_events

    mapping = EventMapping(args.user_col, args.item_col, args.ts_col, args.label_col, args.ts_unit, args.history)
    items = ItemMapping(args.item_id_col, args.category_col, args.title_col)
    return _summary(import_events(args.file, mapping, args.out, args.items, items))


def _taobao_mm(args: argparse.Namespace) -> int:
    from recsys.data.taobao_mm import load_taobao_mm

    return _summary(load_taobao_mm(args.src, args.out, args.max_per_user))
