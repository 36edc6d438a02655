"""`muse similar --data DIR ITEM`: an item's nearest neighbours by embedding, with their titles.

ITEM is a raw item id, or a piece of a title when it is not a number (it must then match one item).
"""
from __future__ import annotations

import argparse

import numpy as np

from recsys.cli import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("similar", help="print an item's nearest neighbours by embedding")
    p.add_argument("--data", required=True, help="data folder on which `muse embed` has run")
    p.add_argument("item", metavar="ITEM", help="raw item id, or a unique piece of its title")
    p.add_argument("-k", type=int, default=10, help="neighbours to show (default: %(default)s)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from recsys.embed.cache import vector_matrix
    from recsys.embed.index import index_path, load_index, search
    from recsys.paths import DataLayout

    layout = DataLayout(args.data)
    if not layout.item_embeddings.exists() or not index_path(layout).exists():
        raise UserError(f"{layout.embeddings_dir}: no item embeddings yet; run `muse embed --data {layout.root}` first")
    if args.k < 1:
        raise UserError(f"-k must be at least 1, got {args.k}")
    titles = _titles(layout)
    item_id = _resolve(args.item, titles)
    embeddings = pq.read_table(layout.item_embeddings, columns=["item_id", "vector"])
    ids = embeddings.column("item_id").to_numpy()
    row = np.flatnonzero(ids == item_id)
    if len(row) == 0:
        raise UserError(f"item {item_id} is not in {layout.item_embeddings}")
    query = vector_matrix(embeddings.column("vector").slice(int(row[0]), 1))
    if not np.any(query):
        raise UserError(f"item {item_id} has no embedding (no title, image or behaviour)")
    scores, neighbours = search(load_index(index_path(layout)), query, args.k + 1)
    print(f"{item_id}  {titles.get(item_id) or '(no title)'}")
    shown = 0
    for score, other in zip(scores[0], neighbours[0]):
        if other == item_id or other < 0 or shown == args.k:
            continue
        shown += 1
        print(f"  {shown:>3}. {score:6.3f}  {other:>10}  {titles.get(int(other)) or '(no title)'}")
    return 0


def _titles(layout) -> dict[int, str]:
    import pyarrow.parquet as pq

    items = pq.read_table(layout.items, columns=["item_id", "title"])
    return {int(i): t or "" for i, t in zip(items.column("item_id").to_pylist(), items.column("title").to_pylist())}


def _resolve(item: str, titles: dict[int, str]) -> int:
    try:
        return int(item)
    except ValueError:
        pass
    needle = item.lower()
    matches = [i for i, t in titles.items() if needle in t.lower()]
    if not matches:
        raise UserError(f"no item title contains {item!r}")
    exact = [i for i in matches if titles[i].lower() == needle]
    if len(exact) == 1:
        return exact[0]
    if len(matches) > 1:
        shown = ", ".join(f"{i} {titles[i]!r}" for i in matches[:8])
        raise UserError(f"{len(matches)} titles contain {item!r} ({shown}{', ...' if len(matches) > 8 else ''}); give the item id")
    return matches[0]
