"""Shared fixtures and an independent float64 checker for cosine top-K outputs."""
from __future__ import annotations

import torch


def make_table(n_items: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """[n_items+1, dim] unit-norm rows, row 0 zero; int8 rows quantised as trunc(v * 127)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.nn.functional.normalize(torch.randn(n_items + 1, dim, generator=gen), dim=1)
    rows[0] = 0
    if dtype == torch.int8:
        return torch.trunc(rows * 127).to(torch.int8)
    return rows.to(dtype)


def exact_cosines(table: torch.Tensor, candidates: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Float64 cosines [B, C, L] (0 against zero rows)."""
    rows = table[history].double()
    cands = table[candidates].double()
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cands = cands / cands.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return cands @ rows.transpose(1, 2)


def eligible(table: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """BoolTensor [B, L]: inside the length, id not 0, row not zero."""
    position = torch.arange(history.shape[1])
    nonzero_row = table[history].float().abs().amax(-1) > 0
    return (position < lengths[:, None]) & (history != 0) & nonzero_row


def assert_valid_topk(table, candidates, history, lengths, k, scores, positions, atol=1e-5):
    """Checks a result against the contract using float64 cosines, whatever the implementation.

    Every slot holds an eligible, distinct position whose cosine matches its score; scores descend,
    equal scores list the larger position first; the set is a top-k (no left-out eligible behaviour
    beats a selected one by more than `atol`); the count is min(k, eligible); the rest is -inf / -1.
    """
    batch, n_cands = candidates.shape
    assert scores.shape == positions.shape == (batch, n_cands, k)
    assert scores.dtype == torch.float32 and positions.dtype == torch.int64
    truth = exact_cosines(table, candidates, history)
    ok = eligible(table, history, lengths)
    for b in range(batch):
        n_ok = int(ok[b].sum())
        for c in range(n_cands):
            count = min(k, n_ok)
            pos, sc = positions[b, c], scores[b, c]
            assert (pos[count:] == -1).all() and torch.isneginf(sc[count:]).all()
            if count == 0:
                continue
            chosen = pos[:count]
            assert (chosen >= 0).all() and ok[b, chosen].all(), f"ineligible position chosen at b={b} c={c}"
            assert len(set(chosen.tolist())) == count, f"duplicate positions at b={b} c={c}"
            torch.testing.assert_close(sc[:count].double(), truth[b, c, chosen], atol=atol, rtol=0)
            assert (sc[: count - 1] >= sc[1:count]).all(), "scores not sorted descending"
            same = sc[: count - 1] == sc[1:count]
            assert (chosen[: count - 1][same] > chosen[1:count][same]).all(), "tie not broken toward recent"
            left_out = ok[b].clone()
            left_out[chosen] = False
            if left_out.any():
                assert truth[b, c, left_out].max() <= truth[b, c, chosen].min() + atol


def sampled_copies_history(screen, length, every, copies=8, seed=7):
    """A history of random items where only the first `copies` sampled positions (0, every,
    2 every, ...) hold one item: that item is the sample's `copies` best (its start's rank), while
    fewer than k behaviours of the history score as high. Returns (history [1, length],
    unit candidate [1, 1, D] equal to that item's row)."""
    gen = torch.Generator().manual_seed(seed)
    n_items = screen.shape[0] - 1
    history = torch.randint(8, n_items + 1, (1, length), generator=gen)
    history[0, : copies * every : every] = 1
    return history, screen[1].float().view(1, 1, -1)
