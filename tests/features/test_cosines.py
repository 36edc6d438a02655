"""The builder's similarity op: bit-identical whatever the batch shape or chunking."""
from __future__ import annotations

import pytest
import torch

from recsys import features

B, C, M, D = 9, 7, 11, 16


@pytest.fixture
def table() -> torch.Tensor:
    weights = torch.randn(50, D, generator=torch.Generator().manual_seed(6))
    weights[0] = 0.0
    return weights


@pytest.mark.parametrize("per_target", [False, True])
def test_cosines_bit_identical_at_any_batch_shape_and_chunking(table, per_target, monkeypatch):
    g = torch.Generator().manual_seed(7)
    targets = torch.randint(0, 50, (B, C), generator=g)
    ids = torch.randint(0, 50, (B, C, M) if per_target else (B, M), generator=g)

    def lookup(x):
        return table[x]

    whole = features._cosines(lookup, D, targets, ids)
    assert whole.shape == (B, C, M)
    unit = torch.nn.functional.normalize(table, dim=-1)
    rows = unit[ids] if per_target else unit[ids].unsqueeze(1)
    assert torch.allclose(whole, (unit[targets].unsqueeze(2) * rows).sum(-1), atol=1e-6)
    assert torch.equal(whole[targets == 0], torch.zeros(int((targets == 0).sum()), M))

    for pieces in (C * M * D * 2, 3 * M * D):  # two users per piece; 3 targets of one user per piece
        monkeypatch.setattr(features, "_COSINE_CHUNK_ELEMENTS", pieces)
        assert torch.equal(features._cosines(lookup, D, targets, ids), whole)
    for b in range(B):
        for c in range(C):
            one = ids[b : b + 1, c : c + 1] if per_target else ids[b : b + 1]
            alone = features._cosines(lookup, D, targets[b : b + 1, c : c + 1], one)
            assert torch.equal(alone[0, 0], whole[b, c])
