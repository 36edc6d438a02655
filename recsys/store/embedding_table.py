"""EmbeddingTable: dense item index -> unit-norm multimodal vector.

Rows are indexed by the dense item vocabulary (row 0 = unknown/padding, all zeros). Storage is
float32, float16, bfloat16 or int8; int8 rows hold ``trunc(clip(v, -1, 1) * 127)`` and are read
back with ``scale = 1/127`` (the TAOBAO-MM convention), so a dequantised row is within 1/127 of
the float row per coordinate.

On disk a table is a folder with ``weights.npy`` (bfloat16 is stored as its raw uint16 bits)
and ``meta.json``; loading never unpickles anything and memory-maps the weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recsys.atomic import atomic_directory

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
_INT8_SCALE = 1.0 / 127.0
# How far a stored row's norm may drift from 1 through rounding in each storage dtype.
_NORM_TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}


class EmbeddingTableError(ValueError):
    """A table that breaks the contract (shape, dtype, norms, row 0)."""


@dataclass
class EmbeddingTable:
    """Item embedding rows in their storage dtype.

    Attributes:
        weights: Tensor [N+1, D] in the storage dtype; row 0 is zero.
        scale: multiply stored values by this to get the float vector (1/127 for int8, else 1.0).
    """

    weights: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.weights.dim() != 2 or self.weights.shape[0] < 1:
            raise EmbeddingTableError(f"weights must be [N+1, D], got shape {tuple(self.weights.shape)}")
        if self.weights.dtype not in _DTYPES.values():
            raise EmbeddingTableError(f"unsupported dtype {self.weights.dtype}; use one of {list(_DTYPES)}")

    @property
    def dtype(self) -> str:
        return next(name for name, dt in _DTYPES.items() if dt == self.weights.dtype)

    @property
    def num_rows(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    @classmethod
    def from_vectors(cls, vectors: np.ndarray | torch.Tensor, dtype: str = "float16") -> "EmbeddingTable":
        """Build a table from float vectors [N+1, D]: rows are L2-normalised, row 0 forced to zero.

        Rows that are all zero (items without any usable content) stay zero.
        """
        if dtype not in _DTYPES:
            raise EmbeddingTableError(f"unknown dtype {dtype!r}; use one of {list(_DTYPES)}")
        v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if v.dim() != 2:
            raise EmbeddingTableError(f"vectors must be [N+1, D], got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            bad = torch.nonzero(~torch.isfinite(v).all(dim=1)).flatten()[:5].tolist()
            raise EmbeddingTableError(f"vectors hold NaN/inf in rows {bad}")
        norms = v.norm(dim=1, keepdim=True)
        v = torch.where(norms > 0, v / norms.clamp_min(1e-12), torch.zeros_like(v))
        v[0] = 0.0
        if dtype == "int8":
            stored = torch.trunc(v.clamp(-1.0, 1.0) * 127.0).to(torch.int8)
            return cls(stored, _INT8_SCALE)
        return cls(v.to(_DTYPES[dtype]), 1.0)

    def to_dtype(self, dtype: str) -> "EmbeddingTable":
        """The same vectors in another storage dtype."""
        return EmbeddingTable.from_vectors(self.as_float(), dtype)

    def as_float(self) -> torch.Tensor:
        """All rows as float32 [N+1, D] (dequantised for int8)."""
        return self.weights.float() * self.scale

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 vectors for dense ids of any shape [...] -> [..., D]. Ids outside the table map to row 0."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        safe = torch.where((ids >= 0) & (ids < self.num_rows), ids, torch.zeros_like(ids))
        rows = self.weights[safe.reshape(-1)].float()
        if self.scale != 1.0:
            rows = rows * self.scale
        return rows.reshape(*ids.shape, self.dim)

    def validate(self) -> None:
        """Check the contract: row 0 zero, every non-zero row unit norm within tolerance."""
        rows = self.as_float()
        if rows[0].abs().max() > 0:
            raise EmbeddingTableError("row 0 (unknown/padding) must be all zeros")
        norms = rows[1:].norm(dim=1)
        # int8 truncation moves each coordinate by < 1/127, so the norm by < sqrt(D)/127.
        tol = _NORM_TOLERANCE.get(self.dtype, self.dim**0.5 / 127.0)
        bad = torch.nonzero((norms > 0) & ((norms - 1).abs() > tol)).flatten()
        if len(bad):
            rows_at_fault = (bad[:5] + 1).tolist()
            raise EmbeddingTableError(f"rows {rows_at_fault} are not unit norm (norms {norms[bad[:5]].tolist()})")

    def save(self, directory: str | Path) -> Path:
        """Write the table atomically to `directory` (a folder), replacing any previous one."""
        with atomic_directory(directory) as tmp:
            array = self.weights.view(torch.uint16) if self.dtype == "bfloat16" else self.weights
            np.save(tmp / "weights.npy", array.contiguous().numpy(), allow_pickle=False)
            meta = {"dtype": self.dtype, "scale": self.scale, "rows": self.num_rows, "dim": self.dim}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "EmbeddingTable":
        """Read a table written by `save` (memory-mapped by default)."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no embedding table at {directory} (missing meta.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("dtype") not in _DTYPES:
            raise EmbeddingTableError(f"{meta_path}: unknown dtype {meta.get('dtype')!r}")
        # Copy-on-write mapping: pages are read lazily and torch can wrap it without a copy.
        array = np.load(directory / "weights.npy", mmap_mode="c" if mmap else None, allow_pickle=False)
        if array.shape != (meta["rows"], meta["dim"]):
            raise EmbeddingTableError(
                f"{directory}: weights.npy has shape {array.shape}, meta.json says {(meta['rows'], meta['dim'])}"
            )
        weights = torch.from_numpy(array)
        if meta["dtype"] == "bfloat16":
            weights = weights.view(torch.bfloat16)
        return cls(weights, float(meta["scale"]))
