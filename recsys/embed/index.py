"""FAISS nearest-neighbour index over item vectors, keyed by raw item id.

Vectors are unit norm, so inner product is cosine. Up to `ivf_threshold` items the index is
exact (flat inner product); above it an IVF index with about 4 * sqrt(N) lists trades a little
recall for sub-linear search (`nprobe` lists are scanned per query).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np

# faiss logs every SIMD variant it tries at INFO while importing; only failures matter to a user.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss  # noqa: E402

from recsys.embed.config import IndexConfig
from recsys.paths import DataLayout



def index_path(layout: DataLayout) -> Path:
    """Where the stage writes the item index: embeddings/items.faiss."""
    return layout.embeddings_dir / "items.faiss"


def build_index(vectors: np.ndarray, item_ids: np.ndarray, config: IndexConfig) -> faiss.Index:
    """Index float32 [N, D] unit vectors under their raw int64 ids [N]."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n >= config.ivf_threshold:
        nlist = max(1, int(4 * math.sqrt(n)))
        base: faiss.Index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.train(vectors)
        base.nprobe = config.nprobe
    else:
        base = faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(vectors, np.ascontiguousarray(item_ids, dtype=np.int64))
    return index


def save_index(index: faiss.Index, path: Path) -> None:
    """Write atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_index(path: Path, nprobe: int | None = None) -> faiss.Index:
    index = faiss.read_index(str(path))
    if nprobe is not None:
        try:
            faiss.extract_index_ivf(index).nprobe = nprobe
        except RuntimeError:  # a flat index has no lists to probe
            pass
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: queries float32 [Q, D] -> (scores float32 [Q, k], item ids int64 [Q, k]; -1 past the end)."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
