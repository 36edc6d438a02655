"""`Vocab`: raw int64 keys -> dense indices 1..N; 0 is unknown and padding.

A vocabulary is built from the sorted distinct keys of a column, so a rebuild on the same data
gives the same indices. `extend` appends unseen keys (sorted among themselves) after N, so
indices already handed to a store, an embedding table or a model never move when new data
arrives. Saved as Parquet with one int64 column `key`: dense index = row + 1.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.cli import UserError
from recsys.schema import write_parquet_atomic

# Dense lookup table when the key range is at most this many slots per key (or this small).
_TABLE_SPAN_PER_KEY = 8
_TABLE_MIN_SPAN = 1 << 16
# From this many queries on, sparse keys are encoded with a hash join rather than a binary search.
_HASH_JOIN_MIN = 1 << 18


class Vocab:
    """Maps raw int64 keys to dense int64 indices 1..N (0 = unknown / padding).

    `keys[i]` is the raw key of dense index i + 1. `encode` has no Python loop: a direct table
    when the keys span a short range (sequential ids), else a hash join for large inputs or a
    binary search over a sorted copy of the keys for small ones (the serving path).
    """

    def __init__(self, keys: np.ndarray, name: str = ""):
        keys = np.asarray(keys)
        if keys.ndim != 1:
            raise ValueError(f"vocab {name!r}: keys must be 1-D, got shape {keys.shape}")
        if keys.dtype != np.int64:
            keys = keys.astype(np.int64)
        self.name = name
        self.keys = keys
        self._table: np.ndarray | bool | None = None  # lazily built by _lookup_table
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]
        if len(keys) > 1 and (self._sorted[1:] == self._sorted[:-1]).any():
            dup = self._sorted[1:][self._sorted[1:] == self._sorted[:-1]][:5].tolist()
            raise ValueError(f"vocab {name!r}: repeated keys {dup}")

    @classmethod
    def from_values(cls, values: np.ndarray, name: str = "") -> Vocab:
        """Vocabulary of the distinct values, sorted ascending (index 1 = smallest key)."""
        return cls(np.unique(np.asarray(values, dtype=np.int64)), name)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def size(self) -> int:
        """Rows an embedding table over this vocabulary needs: N + 1 (row 0 = unknown)."""
        return len(self.keys) + 1

    def __repr__(self) -> str:
        return f"Vocab(name={self.name!r}, n={len(self)})"

    def encode(self, raw: np.ndarray) -> np.ndarray:
        """Raw keys (any shape) -> dense int64 indices of the same shape; 0 for unknown keys."""
        raw = np.asarray(raw, dtype=np.int64)
        if len(self.keys) == 0:
            return np.zeros(raw.shape, dtype=np.int64)
        table = self._lookup_table()
        if table is not None:
            # Keys packed in a short range (sequential ids): one gather, no search. The offset is
            # read as unsigned, so keys below the range (and int64 wrap-around) land past its end,
            # on the table's trailing 0 slot.
            offset = np.minimum((raw - self._sorted[0]).view(np.uint64), np.uint64(len(table) - 1))
            return table[offset.view(np.int64)]  # numpy indexes with int64 without converting
        if raw.size >= _HASH_JOIN_MIN:
            # Sparse (hashed) keys and many queries: a hash join beats a cache-missing binary search.
            dense = pl.Series(raw.reshape(-1)).replace_strict(
                pl.Series(self.keys), pl.Series(np.arange(1, len(self.keys) + 1)), default=0, return_dtype=pl.Int64
            )
            return dense.to_numpy().reshape(raw.shape)
        pos = np.searchsorted(self._sorted, raw)
        pos_clipped = np.minimum(pos, len(self._sorted) - 1)
        found = self._sorted[pos_clipped] == raw
        return np.where(found, self._order[pos_clipped] + 1, 0).astype(np.int64)

    def _lookup_table(self) -> np.ndarray | None:
        """int64 [span + 1]: raw - min -> dense, last slot 0; built on first use for short spans."""
        if self._table is None:
            span = int(self._sorted[-1]) - int(self._sorted[0]) + 1
            if span <= max(_TABLE_SPAN_PER_KEY * len(self.keys), _TABLE_MIN_SPAN):
                table = np.zeros(span + 1, dtype=np.int64)
                table[self._sorted - self._sorted[0]] = self._order + 1
                self._table = table
            else:
                self._table = False
        return self._table if self._table is not False else None

    def decode(self, dense: np.ndarray, unknown: int | None = None) -> np.ndarray:
        """Dense indices (any shape) -> raw keys.

        Index 0 and indices beyond N have no key: they raise ValueError unless `unknown` gives
        the raw value to put there (raw ids are hashed int64, so no sentinel is safe by default).
        """
        dense = np.asarray(dense, dtype=np.int64)
        valid = (dense >= 1) & (dense <= len(self.keys))
        if unknown is None and not valid.all():
            bad = dense[~valid][:5].tolist()
            raise ValueError(f"vocab {self.name!r}: indices {bad} have no key (valid: 1..{len(self)})")
        if len(self.keys) == 0:
            return np.full(dense.shape, unknown, dtype=np.int64)
        out = self.keys[np.where(valid, dense - 1, 0)]
        return np.where(valid, out, unknown if unknown is not None else 0).astype(np.int64)

    def contains(self, raw: np.ndarray) -> np.ndarray:
        """Boolean mask of the raw keys present in the vocabulary."""
        return self.encode(raw) > 0

    def extend(self, new_keys: np.ndarray) -> Vocab:
        """A vocabulary with the unseen keys of `new_keys` appended (sorted) after N.

        Existing keys keep their indices. Returns a new Vocab; `self` is unchanged.
        """
        new_keys = np.unique(np.asarray(new_keys, dtype=np.int64))
        unseen = new_keys[~self.contains(new_keys)]
        if len(unseen) == 0:
            return self
        return Vocab(np.concatenate([self.keys, unseen]), self.name)

    def save(self, path: str | os.PathLike) -> None:
        """Write `key` (int64, dense order) to a Parquet file atomically."""
        write_parquet_atomic(pa.table({"key": pa.array(self.keys, pa.int64())}), path)

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> Vocab:
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: vocabulary file not found (build the data folder first)")
        table = pq.read_table(path)
        if table.column_names != ["key"] or table.schema.field("key").type != pa.int64():
            raise UserError(f"{path}: a vocabulary must have exactly one int64 column 'key', got {table.schema}")
        if table.column("key").null_count:
            raise UserError(f"{path}: vocabulary has null keys")
        return cls(table.column("key").to_numpy(), name if name is not None else path.stem)
