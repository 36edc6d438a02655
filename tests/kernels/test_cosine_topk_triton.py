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
from kernels.triton.cosine_topk import MIN_SPLIT_ROWS, PROGRAMS_PER_SM, cosine_topk_triton, history_splits  # noqa: E402


def small_triton(table, candidates, history, lengths, k, splits=None):
    return cosine_topk_triton(table, candidates, history, lengths, k, block_c=16, block_l=16, splits=splits)


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


@pytest.mark.parametrize("splits", [2, 3, 9])
def test_history_split_in_ranges_merges_to_the_reference(splits):
    """Ranges of whole 16-row tiles (the last one short, one user's range past its length empty),
    merged by key: the same positions as one pass, ties across ranges toward the more recent."""
    table = make_table(50, 16)
    gen = torch.Generator().manual_seed(3)
    history = torch.randint(1, 51, (2, 70), generator=gen)
    history[0, 40:44] = history[0, 3]  # copies of one item on both sides of a range boundary
    history[1, 20] = 0
    lengths = torch.tensor([70, 23])  # user 1 ends inside the second range
    candidates = torch.cat([history[:, 3:4], torch.randint(1, 51, (2, 2), generator=gen)], dim=1)
    scores, positions = small_triton(table, candidates, history, lengths, 5, splits=splits)
    ref_scores, ref_positions = cosine_topk_reference(table, candidates, history, lengths, 5)
    assert torch.equal(positions, ref_positions)
    torch.testing.assert_close(scores, ref_scores, atol=2e-6, rtol=0)
    assert positions[0, 0, :5].tolist() == [43, 42, 41, 40, 3]  # the copies, newest first


def test_more_ranges_than_the_history_has_tiles_and_fewer_behaviours_than_k():
    table = make_table(20, 16)
    history = torch.tensor([[4, 5, 6, 0, 0]])
    scores, positions = small_triton(table, torch.tensor([[4]]), history, torch.tensor([3]), 4, splits=8)
    assert positions[0, 0, 0] == 0 and positions[0, 0, 3] == -1 and scores[0, 0, 3] == float("-inf")
    with pytest.raises(ValueError, match="splits"):
        small_triton(table, torch.tensor([[4]]), history, torch.tensor([3]), 4, splits=0)


def test_history_splits_fill_the_gpu_with_ranges_of_whole_tiles():
    # one ranking request: 2 candidate tiles x ranges of at least MIN_SPLIT_ROWS rows
    assert history_splits(1, 2, 100_000, 128, 132) == min(-(-PROGRAMS_PER_SM * 132 // 2), 782 // (MIN_SPLIT_ROWS // 128))
    assert history_splits(1, 16, 100_000, 128, 132) == -(-PROGRAMS_PER_SM * 132 // 16)
    assert history_splits(100, 16, 1_000, 128, 132) == 1  # users and tiles already fill it
    assert history_splits(1, 2, 1_000, 128, 132) == 1  # too short to split
    assert history_splits(1, 2, 100_000, 128, 0) == 1  # no GPU: the interpreter
