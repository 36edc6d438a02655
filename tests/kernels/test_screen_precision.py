"""kernels.screen_precision: one int8 part or two, learnt per table, and always the exact result."""
from __future__ import annotations

import pytest
import torch

import kernels.cpu_topk as cpu_topk
import kernels.screen_precision as screen_precision
from kernels import cosine_topk, native
from kernels.reference import cosine_topk_reference
from kernels.screen_precision import BF16, ONE_PART, TWO_PARTS, ScreenPrecision, rescreen_level
from topk_checks import assert_valid_topk

MANY = 96  # candidates in a call below


def test_a_failed_one_part_screen_moves_the_table_to_two_parts_and_a_probe_brings_it_back(monkeypatch):
    monkeypatch.setattr(screen_precision, "PROBE_EVERY", 3)
    policy = ScreenPrecision()
    pairs = 200
    level, probing = policy.choose()
    assert (level, probing) == (ONE_PART, False)
    policy.record(level, probing, unproven=2, pairs=pairs)  # 1%: not a failure
    assert policy.level == ONE_PART
    level, probing = policy.choose()
    policy.record(level, probing, unproven=3, pairs=pairs)
    assert policy.level == TWO_PARTS
    # three calls at two parts (their failures change nothing: there is no finer int8 level) ...
    for _ in range(3):
        level, probing = policy.choose()
        assert (level, probing) == (TWO_PARTS, False)
        policy.record(level, probing, unproven=pairs, pairs=pairs)
    assert policy.level == TWO_PARTS
    # ... then a probe of one part; failing, it stays at two parts for three more calls
    assert policy.choose() == (ONE_PART, True)
    policy.record(ONE_PART, True, unproven=pairs, pairs=pairs)
    assert policy.level == TWO_PARTS
    assert [policy.choose() for _ in range(4)] == [(TWO_PARTS, False)] * 3 + [(ONE_PART, True)]
    policy.record(ONE_PART, True, unproven=0, pairs=pairs)  # proving: back to one part
    assert policy.level == ONE_PART and policy.choose() == (ONE_PART, False)


def test_screens_run_again_read_at_least_two_parts():
    assert [rescreen_level(level) for level in (ONE_PART, TWO_PARTS, BF16)] == [TWO_PARTS, TWO_PARTS, BF16]


@pytest.fixture
def int8_everywhere(monkeypatch):
    """The fused screen from the int8 copy for any history (where this CPU can run it)."""
    if not native.available() or not native.int8_available():
        pytest.skip(f"no fused int8 screen here: {native.unavailable_reason() or 'this CPU has no AMX-INT8'}")
    monkeypatch.setattr(cpu_topk, "USE_NATIVE", True)
    monkeypatch.setattr(cpu_topk, "INT8_MIN_LENGTH", 0)
    monkeypatch.setattr(cpu_topk, "INT8_MIN_ROWS_PER_CANDIDATE", 0)


def spy_parts(monkeypatch) -> list[bool]:
    """The `two_parts` argument of every quantisation of candidates, in call order."""
    asked = []
    original = cpu_topk.quantize_candidates
    monkeypatch.setattr(cpu_topk, "quantize_candidates",
                        lambda cands, screen, two_parts=False: asked.append(two_parts) or original(cands, screen, two_parts))
    return asked


def assert_exact(table, candidates, history, lengths, k, fast):
    ref = cosine_topk_reference(table, candidates, history, lengths, k)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("n_cands", [1, 9, MANY + 16])
def test_one_part_screens_exactly(n_cands, int8_everywhere, monkeypatch):
    # Random rows, for 2 users one candidate (a training sample), a few, or many (a padded last
    # tile, a sampled start): one part all along, and the reference's positions exactly.
    gen = torch.Generator().manual_seed(11)
    table = torch.cat([torch.zeros(1, 64), torch.randn(4_000, 64, generator=gen)]).half()
    history = torch.randint(1, 4_001, (2, 1_500), generator=gen)
    lengths = torch.tensor([1_500, 1_100])
    candidates = torch.randint(1, 4_001, (2, n_cands), generator=gen)
    parts = spy_parts(monkeypatch)
    for _ in range(2):
        assert_exact(table, candidates, history, lengths, 20, cosine_topk(table, candidates, history, lengths, 20, impl="cpu"))
    assert parts == [False, False]
    assert cpu_topk._table_prep(table).precision.level == ONE_PART


def test_a_crowded_catalogue_moves_its_table_to_two_parts(int8_everywhere, monkeypatch):
    # Every behaviour within ~1e-3 of one direction and the candidates around it too: one part's
    # window holds the whole history, more than the screen keeps, so no pair proves at first; the
    # screens run again read two parts, and the table's next calls start there. The scores tie
    # to within float32 rounding, where summation orders differ in the last bit (the reference's
    # matmul; the bf16 copy's path, which widens here), so every result is checked against
    # float64 cosines and against the bf16 copy's scores to within that rounding.
    gen = torch.Generator().manual_seed(12)
    base = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    rows = torch.nn.functional.normalize(base + 1e-3 * torch.randn(1_200, 64, generator=gen), dim=1)
    table = torch.cat([torch.zeros(1, 64), rows])
    history = torch.arange(1, 1_201).unsqueeze(0)
    lengths = torch.tensor([1_200])
    candidates = torch.randint(1, 1_201, (1, MANY), generator=gen)
    monkeypatch.setattr(cpu_topk, "USE_INT8", False)
    from_bf16 = cosine_topk(table, candidates, history, lengths, 10, impl="cpu")
    monkeypatch.setattr(cpu_topk, "USE_INT8", True)
    parts = spy_parts(monkeypatch)
    for call in range(2):
        fast = cosine_topk(table, candidates, history, lengths, 10, impl="cpu")
        assert_valid_topk(table, candidates, history, lengths, 10, *fast)
        torch.testing.assert_close(fast[0], from_bf16[0], atol=2e-7, rtol=0)
        if call == 0:
            assert parts[0] is False and len(parts) > 1 and all(parts[1:])
            assert cpu_topk._table_prep(table).precision.level == TWO_PARTS
            parts.clear()
    assert parts and all(parts)
