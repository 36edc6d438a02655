"""Benchmark of the item-embedding stage on MovieLens-100K: GSU quality per embedding source,
text-encoder throughput and the wall time of the whole stage.

GSU quality: for every user, the last engaged item (by time) is held out as the target; the stage
is trained on the other events only (no leakage). A GSU ranks the user's past behaviours by
cosine to the target and keeps the top K (50). A behaviour is relevant when it has the target's
genre (category_id = first genre). Per source we report, over users with more than K past
behaviours (shorter histories are kept whole by any GSU) and at least one relevant one:
  hit@K        share of users with at least one relevant behaviour in the top K
  recall@K     relevant behaviours in the top K / min(relevant behaviours, K)
  precision@K  share of the top K that is relevant
Sources: text (MiniLM features), co-occurrence (I2I), aligned (the stage's output), random.

    python benchmarks/embeddings.py [--data ML100K_DIR] [--work DIR]

Prints JSON and writes benchmarks/results/embeddings.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipelines.embed_items import cache_dir, embed_items
from recsys.data.vocab import Vocab
from recsys.embed.cache import FeatureCache, vector_matrix
from recsys.embed.config import EmbedConfig
from recsys.embed.content import text_inputs
from recsys.embed.encoders import encoder_fingerprint
from recsys.embed.text import MiniLMTextEncoder
from recsys.paths import DataLayout

RESULTS = Path(__file__).resolve().parent / "results" / "embeddings.json"
log = logging.getLogger("bench.embeddings")


def split_last_event(layout: DataLayout, out: DataLayout) -> pl.DataFrame:
    """Write `out` = `layout` without each user's last event; return those held-out targets."""
    events = pl.read_parquet(layout.events).with_row_index("row").sort(["user_id", "ts", "row"])
    last = events.group_by("user_id").agg(pl.col("row").last())
    targets = events.join(last, on=["user_id", "row"], how="semi")
    train = events.join(last, on=["user_id", "row"], how="anti").drop("row")
    out.root.mkdir(parents=True, exist_ok=True)
    shutil.copy(layout.items, out.items)
    shutil.copytree(layout.vocab_dir, out.vocab_dir, dirs_exist_ok=True)
    train.write_parquet(out.events)
    return targets.drop("row")


def dense_matrix(ids: np.ndarray, vectors: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Rows by dense item index [N+1, D], L2-normalised (zero rows stay zero)."""
    out = np.zeros((vocab.size, vectors.shape[1]), dtype=np.float32)
    out[vocab.encode(ids)] = vectors
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def gsu_quality(
    table: np.ndarray, histories: list[np.ndarray], targets: np.ndarray, category: np.ndarray, k: int
) -> dict[str, float]:
    """Mean hit/recall/precision@k of cosine top-k selection over users (see the module docstring)."""
    hits, recalls, precisions = [], [], []
    for history, target in zip(histories, targets):
        relevant = category[history] == category[target]
        if len(history) <= k or not relevant.any():
            continue
        scores = table[history] @ table[target]
        # Items without a vector score below any real cosine (as the GSU kernel treats them).
        scores = np.where(np.linalg.norm(table[history], axis=1) > 0, scores, -1.1)
        top = np.argpartition(-scores, k)[:k]
        found = int(relevant[top].sum())
        hits.append(found > 0)
        recalls.append(found / min(int(relevant.sum()), k))
        precisions.append(found / k)
    return {
        f"hit@{k}": round(float(np.mean(hits)), 4),
        f"recall@{k}": round(float(np.mean(recalls)), 4),
        f"precision@{k}": round(float(np.mean(precisions)), 4),
        "users": len(recalls),
    }


def text_throughput(items_path: Path) -> dict[str, float]:
    """Items/s of the text encoder alone (in this process, model already loaded)."""
    texts = [t for t in text_inputs(pq.read_table(items_path)).inputs if t is not None]
    t0 = time.perf_counter()
    encoder = MiniLMTextEncoder(EmbedConfig().text)
    load_s = time.perf_counter() - t0
    encoder.encode(texts[:32])  # warm-up
    t0 = time.perf_counter()
    encoder.encode(texts)
    seconds = time.perf_counter() - t0
    return {"items": len(texts), "load_seconds": round(load_s, 2), "seconds": round(seconds, 2), "items_per_s": round(len(texts) / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="MovieLens-100K data folder (default: built with `load_movielens` under --work)")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="muse-bench-embed-"))
    if args.data:
        source = DataLayout(args.data)
    else:
        from recsys.data.movielens import load_movielens

        source = load_movielens(work / "ml100k")
    layout = DataLayout(work / "ml100k-train")
    targets = split_last_event(source, layout)

    config = EmbedConfig(seed=args.seed)
    t0 = time.perf_counter()
    summary = embed_items(layout, config, force=True)
    stage_seconds = time.perf_counter() - t0

    vocab = Vocab.load(layout.vocab("item_id"))
    items = pq.read_table(layout.items, columns=["item_id", "category_id"])
    category = np.zeros(vocab.size, dtype=np.int64)
    category[vocab.encode(items.column("item_id").to_numpy())] = items.column("category_id").to_numpy()

    events = pl.read_parquet(layout.events).with_row_index("row").sort(["user_id", "ts", "row"])
    by_user = {u: vocab.encode(g["item_id"].to_numpy()) for (u,), g in events.group_by("user_id")}
    target_users = targets["user_id"].to_list()
    histories = [by_user.get(u, np.zeros(0, dtype=np.int64)) for u in target_users]
    target_items = vocab.encode(targets["item_id"].to_numpy())

    sources: dict[str, np.ndarray] = {}
    text_cache = FeatureCache.open(cache_dir(layout) / "text.parquet", encoder_fingerprint("text", config))
    text_vectors, text_ok = text_cache.get(vocab.keys.tolist())
    sources["text"] = dense_matrix(vocab.keys[text_ok], text_vectors[text_ok], vocab)
    cooc = pq.read_table(cache_dir(layout) / "cooc.parquet")
    sources["cooc"] = dense_matrix(cooc.column("item_id").to_numpy(), vector_matrix(cooc.column("vector")), vocab)
    aligned = pq.read_table(layout.item_embeddings)
    sources["aligned"] = dense_matrix(aligned.column("item_id").to_numpy(), vector_matrix(aligned.column("vector")), vocab)
    rng = np.random.default_rng(args.seed)
    sources["random"] = dense_matrix(vocab.keys, rng.standard_normal((len(vocab), config.align.dim)).astype(np.float32), vocab)

    quality = {name: gsu_quality(table, histories, target_items, category, args.k) for name, table in sources.items()}
    result = {
        "dataset": "MovieLens-100K, last event per user held out",
        "k": args.k,
        "gsu": quality,
        "aligned_recall_over": {
            name: round(quality["aligned"][f"recall@{args.k}"] / quality[name][f"recall@{args.k}"], 3)
            for name in sources
            if name != "aligned"
        },
        "stage": {
            "wall_seconds_including_ray_start": round(stage_seconds, 2),
            "items": summary["items"],
            **{key: summary[key] for key in summary if key.endswith("_seconds")},
        },
        "text_encoder": text_throughput(layout.items),
        "config": config.to_dict(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
