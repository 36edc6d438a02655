"""The Triton kernel under TRITON_INTERPRET=1 (set by tests/conftest.py on machines without CUDA).

The interpreter runs every bitonic compare-swap in Python, so shapes stay tiny: 16 x 16 tiles,
a few tiles per program.
"""
from __future__ import annotations

import pytest
import torch

from kernels import cosine_topk
from kernels.reference import cosine_topk_reference
from topk_checks import assert_valid_topk, make_table

pytest.importorskip("triton")
from kernels.triton.cosine_topk import cosine_topk_triton  # noqa: E402


def small_triton(table, candidates, history, lengths, k):
    return cosine_topk_triton(table, candidates, history, lengths, k, block_c=16, block_l=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_matches_reference_for_every_table_dtype(dtype):
    table = make_table(60, 16, dtype)
    gen = torch.Generator().manual_seed(1)
    history = torch.randint(1, 61, (2, 37), generator=gen)  # 37: not a multiple of the 16-wide tile
    history[0, 5] = 0  # an unknown item inside the history
    lengths = torch.tensor([37, 0])
    candidates = torch.randint(1, 61, (2, 3), generator=gen)
    scores, positions = small_triton(table, candidates, history, lengths, 4)
    ref_scores, ref_positions = cosine_topk_reference(table, candidates, history, lengths, 4)
    assert torch.equal(positions, ref_positions)
    torch.testing.assert_close(scores, ref_scores, atol=2e-6, rtol=0)


def test_ties_padding_short_rows_and_two_candidate_tiles():
    table = make_table(30, 16)
    table[9] = 0  # an item without an embedding
    history = torch.tensor([[5, 7, 5, 9, 5, 0, 0, 0], [3, 0, 0, 4, 0, 0, 0, 0]])
    lengths = torch.tensor([5, 6])  # row 1: fewer eligible behaviours than k
    candidates = torch.tensor([[5] * 17 + [0], [3] * 18])  # 18 candidates: two 16-wide tiles
    scores, positions = small_triton(table, candidates, history, lengths, 4)
    assert_valid_topk(table, candidates, history, lengths, 4, scores, positions, atol=1e-6)
    assert positions[0, 16].tolist() == [4, 2, 0, 1]  # the duplicates of item 5, newest first
    assert positions[0, 17].tolist() == [4, 2, 1, 0]  # a zero candidate: the most recent
    assert positions[1, 0].tolist() == [0, 3, -1, -1]


def test_dispatcher_runs_triton_on_jagged_input():
    table = make_table(40, 16)
    offsets = torch.tensor([0, 3, 3, 21])
    values = torch.randint(1, 41, (21,), generator=torch.Generator().manual_seed(2))
    candidates = torch.tensor([[1, 2], [3, 4], [5, 6]])
    result = cosine_topk(table, candidates, values, k=2, offsets=offsets, impl="triton")
    expected = cosine_topk(table, candidates, values, k=2, offsets=offsets, impl="reference")
    assert torch.equal(result[1], expected[1])
