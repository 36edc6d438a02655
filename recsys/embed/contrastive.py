"""InfoNCE with in-batch negatives and a memory queue of past batches' vectors.

Negatives that are in fact the same item as the anchor or its positive (the same popular item
drawn twice in a batch, or sitting in the queue) are masked out rather than pushed away.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class MemoryQueue:
    """FIFO of the last `size` (detached) vectors [size, D] and their item ids [size] (0 = empty)."""

    def __init__(self, size: int, dim: int):
        self.vectors = torch.zeros(size, dim)
        self.ids = torch.zeros(size, dtype=torch.long)
        self.size = size
        self._next = 0

    def push(self, vectors: torch.Tensor, ids: torch.Tensor) -> None:
        """Add [B, D] vectors (the newest overwrite the oldest)."""
        if self.size == 0:
            return
        vectors, ids = vectors.detach()[-self.size :], ids[-self.size :]
        slots = (self._next + torch.arange(len(ids))) % self.size
        self.vectors[slots] = vectors
        self.ids[slots] = ids
        self._next = int((self._next + len(ids)) % self.size)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        used = self.ids > 0
        return self.vectors[used], self.ids[used]


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    anchor_ids: torch.Tensor,
    positive_ids: torch.Tensor,
    temperature: float,
    queue: MemoryQueue | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over B positive pairs.

    Args:
        anchors, positives: float [B, D], L2-normalised; row i of each is a positive pair.
        anchor_ids, positive_ids: long [B] item ids, used to mask false negatives.
        temperature: softmax temperature tau.
        queue: extra negatives for the anchor -> positive direction.
    Returns:
        scalar loss.
    """
    b = anchors.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=anchors.device)
    targets = torch.arange(b, device=anchors.device)
    logits = anchors @ positives.T / temperature  # [B, B]: anchor i vs positive j

    # Anchor i must not be pushed from positive j when j is the same item as its own positive or itself.
    same_a2p = (positive_ids[None, :] == positive_ids[:, None]) | (positive_ids[None, :] == anchor_ids[:, None])
    a2p = logits.masked_fill(same_a2p & ~eye, float("-inf"))
    if queue is not None:
        q_vectors, q_ids = queue.filled()
        if len(q_ids):
            q_logits = anchors @ q_vectors.T / temperature  # [B, Q]
            same_q = (q_ids[None, :] == positive_ids[:, None]) | (q_ids[None, :] == anchor_ids[:, None])
            a2p = torch.cat([a2p, q_logits.masked_fill(same_q, float("-inf"))], dim=1)
    same_p2a = (anchor_ids[None, :] == anchor_ids[:, None]) | (anchor_ids[None, :] == positive_ids[:, None])
    p2a = logits.T.masked_fill(same_p2a & ~eye, float("-inf"))
    return 0.5 * (F.cross_entropy(a2p, targets) + F.cross_entropy(p2a, targets))
