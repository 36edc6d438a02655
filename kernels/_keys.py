"""Sort keys that carry a float32 score and a position in one int64.

key = (order-preserving int32 form of the score) << 32 | position. Comparing keys as signed int64
compares scores first and, for equal scores, positions: so "largest key first" means "highest score
first, ties toward the more recent (larger) position", and one top-k on keys returns positions too.
A score of -inf marks "no behaviour" and unpacks to position -1.
"""
from __future__ import annotations

import torch

__all__ = ["pack_keys", "unpack_keys"]


def pack_keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pack float32 scores [...] and non-negative int positions [...] (< 2**31) into int64 keys [...]."""
    bits = scores.float().contiguous().view(torch.int32)
    # Negative floats order backwards as integers; flipping their magnitude bits fixes that.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(torch.int64) << 32) | positions.to(torch.int64)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_keys`: (scores float32 [...], positions int64 [...], -1 where the score is -inf)."""
    ordered = (keys >> 32).to(torch.int32)
    scores = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).view(torch.float32)
    positions = (keys & 0xFFFFFFFF).masked_fill(scores == float("-inf"), -1)
    return scores, positions
