"""embed: item embeddings for today's catalogue, re-encoding only new or changed items.

Yesterday's embeddings/ (with its per-modality caches keyed by content hash) is copied into the
staging folder, then `pipelines.embed_items.embed_items` updates it in place: unchanged items
are reused from the cache, new or changed ones are encoded on Ray. With `embed_mode: reuse` the
start folder's embeddings (e.g. the synthetic generator's ground-truth vectors) are carried as
they are: for data whose embeddings come from elsewhere.

Output: embeddings/ (items.parquet, table_<dtype>/, the FAISS index, caches).
"""
from __future__ import annotations

import shutil

from pipelines.stage import StageContext
from pipelines.steps.ingest import previous_layout
from pipelines.views import assemble, link_tree
from recsys.paths import DataLayout


def run(ctx: StageContext) -> None:
    prev = previous_layout(ctx, "embed")
    out = ctx.output / "embeddings"
    if ctx.config.embed_mode == "reuse":
        link_tree(prev.embeddings_dir, out)
        ctx.summary["mode"] = "reuse"
        return
    from pipelines.embed_items import embed_items
    from pipelines.ray_runtime import ensure_ray
    from recsys.embed.config import EmbedConfig

    day = ctx.input("ingest")
    # embed_items writes into its layout's embeddings/: give it a view whose embeddings/ is a real
    # copy of yesterday's (it rewrites cache files in place), with today's tables linked in.
    view = assemble(ctx.scratch / "data", {"items.parquet": day / "items.parquet",
                                           "events.parquet": day / "events.parquet", "vocab": day / "vocab"})
    if prev.embeddings_dir.exists():
        shutil.copytree(prev.embeddings_dir, view / "embeddings")
    ensure_ray()
    summary = embed_items(DataLayout(view), EmbedConfig.from_dict(ctx.config.embed))
    shutil.move(view / "embeddings", out)
    ctx.rows["items"] = int(summary.get("items", 0))
    ctx.summary.update(mode="compute", encoded=summary.get("encoded"), reused=summary.get("reused"))
