"""Per-modality feature cache: item id -> (content hash, ok, vector), valid for one fingerprint.

One Parquet file per modality (item_id int64, content_hash string, ok bool, vector
list<float32>), with the fingerprint of the encoder that produced it in the schema metadata.
A different fingerprint (another model or preprocessing) makes the whole cache stale; a
different content hash makes one item stale. Writes are atomic.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.schema import write_parquet_atomic

log = logging.getLogger(__name__)

_FINGERPRINT_KEY = b"fingerprint"


class FeatureCache:
    """In-memory view of one modality's cached features.

    Attributes:
        fingerprint: the encoder fingerprint these features belong to.
        dim: feature width D (None while empty).
    """

    def __init__(self, path: Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.dim: int | None = None
        self._rows: dict[int, tuple[str, bool, np.ndarray]] = {}

    @classmethod
    def open(cls, path: Path, fingerprint: str) -> "FeatureCache":
        """Load the cache at `path`; empty when absent or written for another fingerprint."""
        cache = cls(path, fingerprint)
        if not cache.path.exists():
            return cache
        table = pq.read_table(cache.path)
        stored = (table.schema.metadata or {}).get(_FINGERPRINT_KEY, b"").decode()
        if stored != fingerprint:
            log.info("%s: written by another encoder configuration; all items will be re-encoded", cache.path)
            return cache
        ids = table.column("item_id").to_numpy()
        hashes = table.column("content_hash").to_pylist()
        ok = table.column("ok").to_numpy(zero_copy_only=False)
        vectors = vector_matrix(table.column("vector"))
        cache.dim = vectors.shape[1] if len(ids) else None
        cache._rows = {int(i): (h, bool(o), v) for i, h, o, v in zip(ids, hashes, ok, vectors)}
        return cache

    def __len__(self) -> int:
        return len(self._rows)

    def stale(self, item_ids: list[int], hashes: list[str]) -> list[int]:
        """Positions i whose item is not cached under hashes[i]."""
        return [i for i, (item, h) in enumerate(zip(item_ids, hashes)) if self._rows.get(item, ("",))[0] != h]

    def put(self, item_ids: list[int], hashes: list[str], vectors: np.ndarray, ok: np.ndarray) -> None:
        """Store B rows: vectors float32 [B, D], ok bool [B]."""
        if len(item_ids) == 0:
            return
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise ValueError(f"{self.path}: encoder returned width {vectors.shape[1]}, cache holds {self.dim}")
        self.dim = int(vectors.shape[1])
        for item, h, v, o in zip(item_ids, hashes, vectors.astype(np.float32), ok):
            self._rows[int(item)] = (h, bool(o), v)

    def get(self, item_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors float32 [B, D] and ok bool [B] for cached items (zeros / False for others)."""
        vectors = np.zeros((len(item_ids), self.dim or 0), dtype=np.float32)
        ok = np.zeros(len(item_ids), dtype=bool)
        for i, item in enumerate(item_ids):
            row = self._rows.get(int(item))
            if row is not None and row[1]:
                ok[i] = True
                vectors[i] = row[2]
        return vectors, ok

    def save(self, keep: set[int] | None = None) -> None:
        """Write the cache atomically, keeping only the ids in `keep` (items that left the catalogue drop out)."""
        items = sorted(i for i in self._rows if keep is None or i in keep)
        dim = self.dim or 0
        vectors = np.stack([self._rows[i][2] for i in items]) if items else np.zeros((0, dim), np.float32)
        table = pa.table(
            {
                "item_id": pa.array(items, pa.int64()),
                "content_hash": pa.array([self._rows[i][0] for i in items], pa.string()),
                "ok": pa.array([self._rows[i][1] for i in items], pa.bool_()),
                "vector": vector_column(vectors),
            }
        ).replace_schema_metadata({_FINGERPRINT_KEY: self.fingerprint.encode()})
        write_parquet_atomic(table, self.path)


def vector_column(vectors: np.ndarray) -> pa.Array:
    """float32 [B, D] -> Arrow list<float32> column (without a Python loop)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    offsets = np.arange(vectors.shape[0] + 1, dtype=np.int64) * vectors.shape[1]
    values = pa.array(vectors.reshape(-1))
    if vectors.size < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    # Beyond 2^31 floats (16M items of 128-d) only 64-bit offsets can address the values.
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)


def vector_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """Arrow list<float32> column of equal-length rows -> float32 [B, D]."""
    column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(column), -1)
