"""General Search Unit: pick, for each (user, target), the K past behaviours the ESU attends to.

Three policies share one output type, so the ESU and the feature builder never branch on them:

- ``muse``: cosine between the target's and each behaviour's multimodal embedding
  (`kernels.cosine_topk` over the `EmbeddingTable`), the top K by similarity.
- ``sim-hard``: behaviours of the target's category, the K most recent (SIM, hard search).
- ``sim-soft``: cosine over learned item-id embeddings passed in as a tensor (SIM, soft search).

Selection runs without gradient: it only decides which behaviours are looked at.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels import cosine_topk

if TYPE_CHECKING:
    from recsys.store.embedding_table import EmbeddingTable
    from recsys.store.sequence_store import HistoryBatch

__all__ = ["POLICIES", "Selection", "select"]

POLICIES = ("muse", "sim-hard", "sim-soft")


@dataclass
class Selection:
    """The K behaviours selected for each of C targets of B users, best first.

    Attributes (all [B, C, K]; empty slots, when fewer than K behaviours qualify, are at the end):
        item_ids, category_ids: LongTensor, 0 in empty slots.
        positions: LongTensor, index into the user's history (0 = oldest), -1 in empty slots.
        mask: BoolTensor, True on selected behaviours.
        scores: float32, the policy's selection score (cosine for muse and sim-soft, 1.0 for a
            category match in sim-hard), 0 in empty slots.
        mm_similarities: float32, multimodal cosine between target and behaviour when a table was
            given (equal to `scores` for muse), else 0; 0 in empty slots.
    """

    item_ids: torch.Tensor
    category_ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor
    mm_similarities: torch.Tensor

    def embeddings(self, table: EmbeddingTable) -> torch.Tensor:
        """Float32 [B, C, K, D] embeddings of the selected behaviours (zero rows in empty slots)."""
        return table.lookup(self.item_ids)


@torch.no_grad()
def select(
    policy: str,
    history: HistoryBatch,
    candidates: torch.Tensor,
    candidate_categories: torch.Tensor | None = None,
    k: int = 50,
    table: EmbeddingTable | None = None,
    id_embeddings: torch.Tensor | None = None,
) -> Selection:
    """Select the top-K behaviours of each user's history for each candidate.

    Args:
        policy: "muse", "sim-hard" or "sim-soft".
        history: HistoryBatch (item_ids, category_ids [B, L], lengths [B]).
        candidates: LongTensor [B, C] target item ids.
        candidate_categories: LongTensor [B, C], needed by sim-hard (category 0 matches nothing).
        k: behaviours per target.
        table: EmbeddingTable of multimodal embeddings; needed by muse, optional otherwise (then
            `mm_similarities` are filled in for the selected behaviours).
        id_embeddings: Tensor [N+1, d] of learned item-id embeddings, needed by sim-soft.

    Returns:
        Selection with fields [B, C, K].
    """
    if candidates.dim() != 2 or candidates.shape[0] != history.item_ids.shape[0]:
        raise ValueError(
            f"gsu.select: `candidates` must be [B, C] with B={history.item_ids.shape[0]}, "
            f"got shape {tuple(candidates.shape)}"
        )
    if policy == "muse":
        if table is None:
            raise ValueError("gsu.select: policy 'muse' needs `table` (the multimodal EmbeddingTable)")
        scores, positions = cosine_topk(table.weights, candidates, history.item_ids, history.lengths, k)
    elif policy == "sim-soft":
        if id_embeddings is None:
            raise ValueError("gsu.select: policy 'sim-soft' needs `id_embeddings` (Tensor [N+1, d])")
        # the tensor itself (selection runs without gradient): the kernel keeps its per-table
        # copies for the same tensor object, and a fresh detach() each call would rebuild them
        scores, positions = cosine_topk(id_embeddings, candidates, history.item_ids, history.lengths, k)
    elif policy == "sim-hard":
        if candidate_categories is None or candidate_categories.shape != candidates.shape:
            raise ValueError(
                "gsu.select: policy 'sim-hard' needs `candidate_categories` shaped like `candidates` "
                f"{tuple(candidates.shape)}"
            )
        positions = _most_recent_same_category(history, candidate_categories, k)
        scores = (positions >= 0).float()
    else:
        raise ValueError(f"gsu.select: unknown policy {policy!r}; choose one of {POLICIES}")

    mask = positions >= 0
    batch, n_cands = candidates.shape
    flat = positions.clamp_min(0).reshape(batch, n_cands * k)
    item_ids = history.item_ids.gather(1, flat).view(batch, n_cands, k).masked_fill(~mask, 0)
    category_ids = history.category_ids.gather(1, flat).view(batch, n_cands, k).masked_fill(~mask, 0)
    scores = scores.masked_fill(~mask, 0.0)
    if policy == "muse":
        mm_similarities = scores
    elif table is not None:
        mm_similarities = _cosine(table.weights, candidates, item_ids).masked_fill(~mask, 0.0)
    else:
        mm_similarities = torch.zeros_like(scores)
    return Selection(item_ids, category_ids, positions, mask, scores, mm_similarities)


def _most_recent_same_category(history: HistoryBatch, categories: torch.Tensor, k: int) -> torch.Tensor:
    """Positions [B, C, k] of the k most recent behaviours sharing each candidate's category.

    Sorts each history once by (category, position) and binary-searches every candidate's category,
    so memory is O(B*L + B*C*k) instead of a [B, C, L] match matrix. -1 where fewer than k match.
    """
    batch, length = history.item_ids.shape
    n_cands = categories.shape[1]
    device = history.item_ids.device
    if length == 0:
        return torch.full((batch, n_cands, k), -1, dtype=torch.int64, device=device)
    stride = length + 1
    position = torch.arange(length, device=device)
    real = (position < history.lengths.unsqueeze(1)) & (history.item_ids != 0) & (history.category_ids != 0)
    # Sorting key category * (L+1) + position groups each category, oldest to newest; unusable
    # behaviours get the largest key so they sort past every category.
    keys = torch.where(real, history.category_ids * stride + position, torch.iinfo(torch.int64).max)
    keys = keys.sort(dim=1).values
    lo = torch.searchsorted(keys, categories * stride)  # [B, C]
    hi = torch.searchsorted(keys, (categories + 1) * stride)
    index = hi.unsqueeze(-1) - 1 - torch.arange(k, device=device)  # newest first, [B, C, k]
    found = (index >= lo.unsqueeze(-1)) & (categories != 0).unsqueeze(-1)
    picked = keys.gather(1, index.clamp(0, length - 1).view(batch, -1)).view(batch, n_cands, k)
    return torch.where(found, picked % stride, -1)


def _cosine(weights: torch.Tensor, candidates: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """Float32 cosine [B, C, K] between each candidate [B, C] row and its selected items [B, C, K]."""

    def unit(rows: torch.Tensor) -> torch.Tensor:
        return rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    return (unit(weights[item_ids].float()) * unit(weights[candidates].float()).unsqueeze(2)).sum(-1)
