"""The builder's similarity op: bit-identical whatever the batch shape or chunking."""
from __future__ import annotations

import pytest
import torch

from kernels import native
from recsys import features

B, C, M, D = 9, 7, 11, 16

needs_native = pytest.mark.skipif(not native.available(), reason="the native CPU kernels are not built here")


@pytest.fixture
def table() -> torch.Tensor:
    weights = torch.randn(50, D, generator=torch.Generator().manual_seed(6))
    weights[0] = 0.0
    weights[13] = 0.0  # an item without content: a zero row like the unknown one
    return weights


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch) -> str:
    """Run a test through the native kernel and through the torch fallback."""
    if request.param == "native" and not native.available():
        pytest.skip("the native CPU kernels are not built here")
    if request.param == "torch":
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param


def _inputs(per_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    targets = torch.randint(0, 50, (B, C), generator=g)
    ids = torch.randint(0, 50, (B, C, M) if per_target else (B, M), generator=g)
    return targets, ids


@pytest.mark.parametrize("per_target", [False, True])
def test_cosines_bit_identical_at_any_batch_shape_and_chunking(table, per_target, path, monkeypatch):
    targets, ids = _inputs(per_target)
    whole = features._cosines(table, targets, ids)
    assert whole.shape == (B, C, M)
    unit = torch.nn.functional.normalize(table, dim=-1)
    rows = unit[ids] if per_target else unit[ids].unsqueeze(1)
    assert torch.allclose(whole, (unit[targets].unsqueeze(2) * rows).sum(-1), atol=1e-6)
    assert torch.equal(whole[(targets == 0) | (targets == 13)], torch.zeros(int(((targets == 0) | (targets == 13)).sum()), M))
    zero_rows = (ids == 0) | (ids == 13)
    assert (whole[zero_rows if per_target else zero_rows.unsqueeze(1).expand(B, C, M)] == 0).all()

    for pieces in (C * M * D * 2, 3 * M * D):  # two users per piece; 3 targets of one user per piece
        monkeypatch.setattr(features, "_COSINE_CHUNK_ELEMENTS", pieces)
        assert torch.equal(features._cosines(table, targets, ids), whole)
    for b in range(B):
        for c in range(C):
            one = ids[b : b + 1, c : c + 1] if per_target else ids[b : b + 1]
            alone = features._cosines(table, targets[b : b + 1, c : c + 1], one)
            assert torch.equal(alone[0, 0], whole[b, c])


def test_cosines_read_ids_outside_the_table_as_unknown_items(table, path):
    targets = torch.tensor([[1, 50, -1]])
    ids = torch.tensor([[2, 99, 1]])
    got = features._cosines(table, targets, ids)
    assert got[0, 0, 2] == pytest.approx(1.0, abs=1e-6) and got[0, 0, 1] == 0
    assert torch.equal(got[0, 1:], torch.zeros(2, 3))


def test_a_table_the_kernel_does_not_read_takes_the_torch_path(table):
    # float64 (say, id embeddings of a double-precision model): no native dtype, same cosines
    targets, ids = _inputs(per_target=True)
    double = features._cosines(table.double(), targets, ids)
    torch.testing.assert_close(double, features._cosines(table, targets, ids), atol=1e-6, rtol=0)
    if native.available():
        with pytest.raises(ValueError, match="CPU tensor"):
            native.pair_cosines(table.double(), targets, ids)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("per_target", [False, True])
def test_native_cosines_agree_with_the_torch_path_for_every_storage_dtype(table, dtype, per_target, monkeypatch):
    # an int8 table is read without its scale: it cancels in a cosine
    stored = (torch.nn.functional.normalize(table, dim=-1) * 127).round().to(torch.int8) if dtype == torch.int8 else table.to(dtype)
    targets, ids = _inputs(per_target)
    fast = features._cosines(stored, targets, ids)
    monkeypatch.setattr(native, "available", lambda: False)
    torch.testing.assert_close(fast, features._cosines(stored, targets, ids), atol=1e-6, rtol=0)
