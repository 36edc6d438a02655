"""Plain PyTorch reference implementations: the ground truth the fast paths are tested against.

Written for clarity, not speed: the whole [B, C, L] score matrix is materialised in float32.
"""
from __future__ import annotations

import torch

__all__ = ["cosine_topk_reference"]


@torch.no_grad()
def cosine_topk_reference(
    table: torch.Tensor,
    candidates: torch.Tensor,
    history: torch.Tensor,
    lengths: torch.Tensor,
    k: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K history positions by cosine to each candidate, straightforwardly.

    Args:
        table: [N+1, D] item embeddings (any float dtype or int8; a scale factor cancels in a cosine).
        candidates: [B, C] item ids.
        history: [B, L] item ids, chronological (oldest first), left-aligned, 0 = padding.
        lengths: [B] number of behaviours of each row.
        k: how many positions to keep per (user, candidate).

    Returns:
        scores float32 [B, C, k] sorted descending, ties toward the larger position;
        positions int64 [B, C, k]; slots beyond the valid behaviours hold score -inf and position -1.
        A behaviour is valid when its position is < lengths[b], its id is not 0 and its row is not zero.
    """
    batch, length = history.shape
    rows = table[history].float()  # [B, L, D]
    row_norms = torch.linalg.vector_norm(rows, dim=-1)  # [B, L]
    unit_rows = rows / row_norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    cands = table[candidates].float()  # [B, C, D]
    cand_norms = torch.linalg.vector_norm(cands, dim=-1, keepdim=True)
    unit_cands = cands / cand_norms.clamp_min(torch.finfo(torch.float32).tiny)
    scores = unit_cands @ unit_rows.transpose(1, 2)  # [B, C, L]

    position = torch.arange(length, device=history.device)
    valid = (position < lengths.unsqueeze(1)) & (history != 0) & (row_norms > 0)  # [B, L]
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))

    # Reversing the positions first makes a stable descending sort put the more recent of two
    # equal scores first.
    reversed_scores = scores.flip(-1)
    order = torch.sort(reversed_scores, dim=-1, descending=True, stable=True).indices[..., :k]
    top_scores = reversed_scores.gather(-1, order)
    top_positions = (length - 1) - order
    top_positions = top_positions.masked_fill(top_scores == float("-inf"), -1)

    missing = k - top_scores.shape[-1]
    if missing > 0:  # fewer history slots than k
        top_scores = torch.nn.functional.pad(top_scores, (0, missing), value=float("-inf"))
        top_positions = torch.nn.functional.pad(top_positions, (0, missing), value=-1)
    return top_scores, top_positions
