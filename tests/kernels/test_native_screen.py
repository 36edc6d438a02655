"""kernels.native: the fused AMX screen against a float64 evaluation of the same bf16 (or int8) products."""
from __future__ import annotations

import math

import pytest
import torch

import kernels.cpu_topk as cpu_topk
from kernels import native
from kernels.int8_screen import LO_STEPS, build_int8_screen, int8_screen_error, quantize_candidates
from topk_checks import sampled_copies_history

needs_amx = pytest.mark.skipif(not native.available(), reason=f"native screen unavailable: {native.unavailable_reason()}")
# Tests of the screen's contract run on both copies of the table: bf16 and int8 (AMX-INT8), the
# latter with candidates in one part and in two.
_no_int8 = pytest.mark.skipif(not native.int8_available(), reason="no AMX-INT8 here")
copies = pytest.mark.parametrize("copy", [
    "bf16", pytest.param("int8", marks=_no_int8), pytest.param("int8x2", marks=_no_int8),
])


def unit_table(n_items: int, dim: int, seed: int) -> torch.Tensor:
    """bf16 unit rows [n_items + 1, dim]; row 0 and rows 3 and 7 are zero (ineligible items)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.nn.functional.normalize(torch.randn(n_items + 1, dim, generator=gen), dim=1)
    table[[0, 3, 7]] = 0
    return table.to(torch.bfloat16).contiguous()


def int8_copy(screen, unit_cands, two_parts=False):
    """The int8 screen of a bf16 unit table [N+1, D] and the candidates [B, C, D] quantised for it."""
    table = screen.float()
    norms = table.norm(dim=1)
    int8 = build_int8_screen(table, torch.where(norms > 0, 1 / norms.clamp_min(1e-30), 0.0), 1 << 16)
    return int8, quantize_candidates(unit_cands, int8, two_parts=two_parts)


def int8_codes(quantised, n_cands, dim):
    """float64 [B, C, D]: the candidates' codes in units of their scale (hi x LO_STEPS + lo with two parts)."""
    codes = quantised.codes[:, :n_cands, :dim].double()
    if quantised.lo is not None:
        codes = codes * LO_STEPS + quantised.lo[:, :n_cands, :dim].double()
    return codes


def check_screen(screen, unit_cands, history, lengths, keep, threads, k=None, window=float("inf"), sample_every=0,
                 copy="bf16"):
    """The screen's contract, checked against float64 products; with a finite window, also that
    nothing within the window below the k-th best was dropped (unless `keep` was reached).
    copy="int8" / "int8x2": the same on the int8 copy of `screen` (a bf16 unit table), candidates in
    one part / two."""
    k = keep if k is None else k
    int8_cands = None
    if copy.startswith("int8"):
        int8, int8_cands = int8_copy(screen, unit_cands, two_parts=copy == "int8x2")
        assert (int8_cands.lo is not None) == (copy == "int8x2")
        screen = int8.rows
    scores, positions, bound, n_valid = native.screen_topk(
        screen, unit_cands, history, lengths, keep, k, window, sample_every=sample_every, threads=threads,
        int8_cands=int8_cands,
    )
    if int8_cands is None:
        exact = unit_cands.to(torch.bfloat16).double() @ screen[history].double().transpose(1, 2)  # [B, C, L]
    else:
        n_cands, dim = unit_cands.shape[1:]
        codes = int8_codes(int8_cands, n_cands, dim)
        exact = codes @ screen[history, :dim].double().transpose(1, 2) * int8_cands.scale[:, :n_cands, None].double()
    eligible = (history != 0) & (torch.arange(history.shape[1]) < lengths[:, None]) & screen[history].ne(0).any(-1)
    assert torch.equal(n_valid, eligible.sum(1))
    for b in range(history.shape[0]):
        allowed = eligible[b].nonzero().flatten()
        for c in range(unit_cands.shape[1]):
            kept = positions[b, c][positions[b, c] >= 0]
            if window == float("inf"):
                assert len(kept) == min(keep, len(allowed))
            elif len(kept) < keep and len(allowed) >= k:
                kth = exact[b, c, allowed].topk(k).values[-1]
                assert set((exact[b, c] >= kth - window + 1e-5).logical_and(eligible[b]).nonzero().flatten().tolist()) <= set(kept.tolist())
                assert bound[b, c] <= kth - window + 1e-5
            assert len(set(kept.tolist())) == len(kept)
            assert set(kept.tolist()) <= set(allowed.tolist())
            assert (scores[b, c, len(kept):] == float("-inf")).all() and (positions[b, c, len(kept):] == -1).all()
            torch.testing.assert_close(scores[b, c, : len(kept)].double(), exact[b, c, kept], atol=1e-5, rtol=0)
            left_out = sorted(set(allowed.tolist()) - set(kept.tolist()))
            if not left_out:
                assert bound[b, c] == float("-inf")
                continue
            # The contract: nothing left out scored above the bound, nothing kept below it.
            assert exact[b, c, left_out].max() <= bound[b, c] + 1e-5
            assert exact[b, c, kept].min() >= bound[b, c] - 1e-5
    return scores, positions, bound


@needs_amx
@copies
@pytest.mark.parametrize("dim", [128, 24, 40, 25])
@pytest.mark.parametrize("n_cands", [1, 17, 40, 150])
@pytest.mark.parametrize("threads", [1, 4])
def test_survivors_and_bound_match_a_float64_evaluation(dim, n_cands, threads, copy, monkeypatch):
    # Users split into pieces (threads > users) are merged; dims and candidate counts that are
    # not multiples of the tile sizes are padded; ids 0, zero rows and lengths shorter than the row.
    # 150 candidates: 10 candidate tiles, five units of two.
    monkeypatch.setattr(native, "MIN_SPLIT_ROWS", 64)
    screen = unit_table(500, dim, seed=dim)
    gen = torch.Generator().manual_seed(n_cands)
    history = torch.randint(1, 501, (3, 700), generator=gen)
    history[torch.rand(3, 700, generator=gen) < 0.05] = 0
    history[:, 10] = 3  # a zero row
    lengths = torch.tensor([700, 250, 0])
    unit_cands = torch.nn.functional.normalize(torch.randn(3, n_cands, dim, generator=gen), dim=-1)
    check_screen(screen, unit_cands, history, lengths, keep=30, threads=threads, copy=copy)


@needs_amx
@copies
@pytest.mark.parametrize("n_cands", [17, 40, 100, 300])
@pytest.mark.parametrize("min_split_rows", [16_384, 300])
@pytest.mark.parametrize("window", [float("inf"), 0.05])
def test_one_user_split_by_candidates_and_rows(n_cands, min_split_rows, window, copy, monkeypatch):
    # One user and 4 threads: a history too short to split by rows is split by candidates
    # (ranges of 32, the last one maybe a single tile of 16); with min_split_rows = 300 into 2 row
    # ranges x 2 candidate ranges. Each range's survivors are merged; eligible rows counted once.
    monkeypatch.setattr(native, "MIN_SPLIT_ROWS", min_split_rows)
    screen = unit_table(500, 128, seed=n_cands)
    gen = torch.Generator().manual_seed(n_cands + 1)
    history = torch.randint(0, 501, (1, 700), generator=gen)
    unit_cands = torch.nn.functional.normalize(torch.randn(1, n_cands, 128, generator=gen), dim=-1)
    check_screen(screen, unit_cands, history, torch.tensor([650]), keep=30, threads=4, k=10, window=window, copy=copy)


@needs_amx
@_no_int8
@pytest.mark.parametrize("seed", range(4))
def test_two_part_candidates_mark_groups_by_their_hi_part_with_a_slack(seed):
    # Rows packed within ~0.01 of each other: a lo part often reorders them, so a group marked by
    # its hi sums alone without `mark_slack` drops rows the bound says were kept (this failed
    # 17 seeds in 20 with the slack at 0).
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(1, 64, generator=gen), dim=1)
    rows = torch.nn.functional.normalize(base + 0.005 * torch.randn(3_000, 64, generator=gen), dim=1)
    screen = torch.cat([torch.zeros(1, 64), rows]).to(torch.bfloat16)
    history = torch.randint(1, 3_001, (1, 2_000), generator=gen)
    unit_cands = torch.nn.functional.normalize(base + 0.3 * torch.randn(1, 17, 64, generator=gen), dim=-1)
    check_screen(screen, unit_cands, history, torch.tensor([2_000]), keep=10, threads=1, copy="int8x2")


@needs_amx
def test_fewer_eligible_than_keep_keeps_them_all():
    screen = unit_table(50, 32, seed=1)
    history = torch.tensor([[5, 0, 6, 7, 8, 0, 0, 0]])
    unit_cands = torch.nn.functional.normalize(torch.randn(1, 3, 32), dim=-1)
    _, _, bound = check_screen(screen, unit_cands, history, torch.tensor([6]), keep=10, threads=2)
    assert (bound == float("-inf")).all()


@needs_amx
@copies
def test_ties_at_the_cut_respect_the_bound(copy, monkeypatch):
    # A history of 3 items repeated: hundreds of exactly equal scores straddle every cut.
    monkeypatch.setattr(native, "MIN_SPLIT_ROWS", 32)
    screen = unit_table(20, 64, seed=2)
    history = torch.tensor([[11, 12, 13] * 400])
    unit_cands = torch.nn.functional.normalize(torch.randn(1, 5, 64), dim=-1)
    scores, _, bound = check_screen(screen, unit_cands, history, torch.tensor([1200]), keep=50, threads=3, copy=copy)
    assert (scores[0].amin(-1) == bound[0]).all()  # the cut falls inside the block of the best item


@needs_amx
@copies
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("sample_every", [0, 8])
def test_the_window_drops_what_lies_too_far_below_the_kth(threads, sample_every, copy, monkeypatch):
    # k = 10 of 3,000 random rows with room for 400: only the window around the 10th best should
    # stay, far fewer than `keep`; what it drops still respects the bound (check_screen). With a
    # sampled start (pieces of 1,000 rows or more: 125 sampled rows each) the same holds.
    monkeypatch.setattr(native, "MIN_SPLIT_ROWS", 512)
    screen = unit_table(5_000, 128, seed=5)
    gen = torch.Generator().manual_seed(5)
    history = torch.randint(1, 5_001, (2, 3_000), generator=gen)
    unit_cands = torch.nn.functional.normalize(torch.randn(2, 20, 128, generator=gen), dim=-1)
    _, positions, _ = check_screen(screen, unit_cands, history, torch.tensor([3_000, 2_000]), keep=400,
                                   threads=threads, k=10, window=0.03, sample_every=sample_every, copy=copy)
    kept = (positions >= 0).sum(-1).float()
    assert kept.max() < 400 and kept.mean() < 100


@needs_amx
@copies
def test_each_candidate_can_have_a_window_of_its_own(copy):
    # The same screen with a window per candidate: the one candidate given a narrower window keeps
    # fewer survivors (and still what lies within it of its k-th best), every other keeps exactly
    # what the call-wide window kept.
    screen = unit_table(5_000, 128, seed=6)
    gen = torch.Generator().manual_seed(6)
    history = torch.randint(1, 5_001, (2, 3_000), generator=gen)
    lengths = torch.tensor([3_000, 2_500])
    unit_cands = torch.nn.functional.normalize(torch.randn(2, 20, 128, generator=gen), dim=-1)
    int8_cands = None
    if copy.startswith("int8"):
        int8, int8_cands = int8_copy(screen, unit_cands, two_parts=copy == "int8x2")
        screen = int8.rows
    call = dict(keep=400, k=10, window=0.03, threads=2, int8_cands=int8_cands)
    wide = native.screen_topk(screen, unit_cands, history, lengths, **call)
    windows = torch.full((2, 20), 0.03)
    windows[1, 7] = 0.008
    own = native.screen_topk(screen, unit_cands, history, lengths, **call, windows=windows)
    others = torch.ones(2, 20, dtype=torch.bool)
    others[1, 7] = False
    for wide_part, own_part in zip(wide, own[:3]):
        assert torch.equal(wide_part[others], own_part[others])
    kept, wide_kept = own[1][1, 7][own[1][1, 7] >= 0], wide[1][1, 7][wide[1][1, 7] >= 0]
    assert 10 <= len(kept) < 0.7 * len(wide_kept)
    wide_scores = wide[0][1, 7][wide[1][1, 7] >= 0]
    near = wide_kept[wide_scores >= wide_scores.topk(10).values[-1] - 0.008]
    assert set(near.tolist()) <= set(kept.tolist())  # nothing within the narrow window was lost
    # the windows in units of a factor (a caller passes its errors and 2.02) keep the same
    scaled = native.screen_topk(screen, unit_cands, history, lengths, **call, windows=windows / 4, window_factor=4.0)
    for own_part, scaled_part in zip(own, scaled):
        assert torch.equal(own_part, scaled_part)


@needs_amx
def test_a_sampled_start_leaves_out_what_lies_below_the_sampled_value():
    # The 8 copies of the candidate's own item are all the sample's bests: the threshold starts a
    # window below their score (1.0), so nothing else is taken, and the bound says so (fewer than
    # k survive: the caller's proof fails, as the next test of cosine_topk shows). Without a sample
    # the running threshold keeps the window of the k-th best.
    screen = unit_table(5_000, 128, seed=8)
    history, unit_cands = sampled_copies_history(screen, 4_000, every=50)
    lengths = torch.tensor([4_000])
    scores, positions, bound, _ = native.screen_topk(screen, unit_cands, history, lengths, 150, 50, 0.01,
                                                     sample_every=50, threads=1)
    kept = positions[0, 0][positions[0, 0] >= 0]
    assert sorted(kept.tolist()) == list(range(0, 400, 50))
    assert 0.98 < float(bound[0, 0]) < float(scores[0, 0, : len(kept)].min())
    _, positions, bound, _ = native.screen_topk(screen, unit_cands, history, lengths, 150, 50, 0.01, threads=1)
    assert (positions[0, 0] >= 0).sum() >= 50 and float(bound[0, 0]) < 0.5


@needs_amx
def test_fused_screen_scores_stay_within_the_stated_error():
    # Every screened score against the exact cosine of the original (float16) table, for a table
    # of random rows and one of heavy-tailed rows (a few large components: larger rounding).
    gen = torch.Generator().manual_seed(6)
    for rows in (torch.randn(3_000, 128, generator=gen), torch.randn(3_000, 128, generator=gen).pow(3)):
        table = torch.cat([torch.zeros(1, 128), rows]).half()
        prep = cpu_topk._table_prep(table)
        unit = torch.nn.functional.normalize(table.double(), dim=1)
        assert prep.screen_error == pytest.approx(float((prep.screen.double() - unit).norm(dim=1).max()), rel=1e-3, abs=1e-6)
        assert prep.screen_error < 2.0**-8
        unit_cands = torch.nn.functional.normalize(table[torch.randint(1, 3_001, (1, 40), generator=gen)].float(), dim=-1)
        history = torch.arange(1, 3_001).unsqueeze(0)
        scores, positions, _, _ = native.screen_topk(prep.screen, unit_cands, history, torch.tensor([3_000]), 3_000, 3_000, float("inf"))
        exact = torch.einsum("cd,cmd->cm", unit_cands[0].double(), unit[history[0, positions[0]]])
        cand_error = float((unit_cands.bfloat16().float() - unit_cands).norm(dim=-1).max())
        error, relative = cpu_topk.measured_screen_error(128, prep.screen_error, cand_error, rounded=False)
        assert relative == 0.0
        worst = float((scores[0].double() - exact).abs().max())
        assert worst <= error
        assert error < 0.8 * cpu_topk.screen_error_bound(128)[0]  # tighter than the worst case


@needs_amx
@pytest.mark.skipif(not native.int8_available(), reason="no AMX-INT8 here")
def test_int8_screen_scores_stay_within_the_stated_error():
    # As above for the int8 copy: the rounding reported for rows and candidates is the one done,
    # and every screened score lies within int8_screen_error of the exact cosine.
    gen = torch.Generator().manual_seed(7)
    for rows in (torch.randn(3_000, 128, generator=gen), torch.randn(3_000, 128, generator=gen).pow(3)):
        table = torch.cat([torch.zeros(1, 128), rows]).half()
        int8 = cpu_topk._int8_copy(table, cpu_topk._table_prep(table))
        unit = torch.nn.functional.normalize(table.double(), dim=1)
        dequantised = int8.rows.double() * int8.dim_scale.double()
        assert int8.row_error == pytest.approx(float((dequantised - unit).norm(dim=1).max()), rel=1e-3, abs=1e-6)
        assert int8.rows.abs().max() == 127 and (int8.rows[0] == 0).all()
        unit_cands = torch.nn.functional.normalize(table[torch.randint(1, 3_001, (1, 40), generator=gen)].float(), dim=-1)
        errors = []
        for two_parts in (False, True):
            quantised = quantize_candidates(unit_cands, int8, two_parts=two_parts)
            rounded = int8_codes(quantised, 40, 128) * quantised.scale[:, :40, None].double() / int8.dim_scale.double()
            assert quantised.norm == pytest.approx(float(rounded.norm(dim=-1).max()), rel=1e-5)
            assert quantised.error == pytest.approx(float((rounded - unit_cands.double()).norm(dim=-1).max()), rel=1e-3)
            history = torch.arange(1, 3_001).unsqueeze(0)
            scores, positions, _, _ = native.screen_topk(int8.rows, unit_cands, history, torch.tensor([3_000]), 3_000,
                                                         3_000, float("inf"), int8_cands=quantised)
            exact = torch.einsum("cd,cmd->cm", unit_cands[0].double(), unit[history[0, positions[0]]])
            errors.append(int8_screen_error(128, int8.row_error, quantised.error, quantised.norm))
            assert float((scores[0].double() - exact).abs().max()) <= errors[-1] < 0.1
            # each candidate's own error: its own rounding and norm in the same bound, at most
            # the call's, and met by every score of that candidate
            own = torch.tensor([int8_screen_error(128, int8.row_error, float(e), float(n)) for e, n in
                                zip((rounded - unit_cands.double()).norm(dim=-1)[0], rounded.norm(dim=-1)[0])],
                               dtype=torch.float64)
            torch.testing.assert_close(quantised.errors[0].double(), own, rtol=1e-6, atol=0)
            assert (quantised.errors[0].double() >= own).all() and float(quantised.errors.max()) <= errors[-1]
            assert ((scores[0].double() - exact).abs().amax(1) <= quantised.errors[0].double()).all()
            if not two_parts:  # one part: the candidates' roundings differ enough to matter
                assert float(quantised.errors.mean()) < 0.95 * errors[-1]
        assert quantised.error < 0.02 * errors[0]  # two parts: the candidates' rounding all but gone
        assert errors[1] < 0.8 * errors[0]


def test_a_failing_compiler_leaves_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.delenv("MUSE_NATIVE_KERNELS", raising=False)  # the suite may run with them switched off
    monkeypatch.setenv("MUSE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_cpu_flags", lambda: set(native._REQUIRED_CPU_FLAGS))
    monkeypatch.setenv("CC", "false")
    fn, reason = native._load()
    assert fn is None and "could not build screen_amx.c" in reason and "false exited" in reason
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_a_cpu_without_amx_is_told_apart_before_anything_is_built(monkeypatch, tmp_path):
    monkeypatch.delenv("MUSE_NATIVE_KERNELS", raising=False)
    monkeypatch.setenv("MUSE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "f16c", "avx512_bf16"})
    assert native._load() == (None, "this CPU does not offer amx_tile, amx_bf16")
    assert list(tmp_path.iterdir()) == []


def test_the_environment_can_switch_native_kernels_off(monkeypatch):
    monkeypatch.setenv("MUSE_NATIVE_KERNELS", "0")
    assert native._load() == (None, "disabled by MUSE_NATIVE_KERNELS=0")


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("dim", [128, 24])
def test_rescore_topk_is_the_float32_top_k_with_ties_to_the_recent(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    table = torch.randn(60, dim, generator=gen)
    table = (table * 40).to(torch.int8) if dtype == torch.int8 else table.to(dtype)
    table[[0, 9]] = 0  # id 0 and a zero row: never eligible
    rows = table.double()
    norms = rows.norm(dim=1)
    inv_norm = torch.where(norms > 0, 1 / norms, 0).float()
    unit_cands = torch.nn.functional.normalize(torch.randn(2, 3, dim, generator=gen), dim=-1)
    history = torch.randint(0, 60, (2, 90), generator=gen)
    history[:, 20] = history[:, 70] = 17  # the same item twice: the later copy ranks first
    lengths = torch.tensor([90, 50])
    positions = torch.stack([torch.randperm(90, generator=gen)[:40] for _ in range(6)]).view(2, 3, 40)
    positions[..., :2] = torch.tensor([20, 70])
    positions[..., 39] = -1  # an unused slot
    exact = torch.einsum("bcd,bcmd->bcm", unit_cands.double(), rows[history.gather(1, positions.clamp_min(0).flatten(1)).view(2, 3, 40)])
    exact *= inv_norm.double()[history.gather(1, positions.clamp_min(0).flatten(1)).view(2, 3, 40)]
    # Screened scores off by up to the stated error: the k best by screened score are not the
    # k best exactly, so the second round must find the rest.
    error = (0.05, 0.01)
    noise = (torch.rand(2, 3, 40, generator=gen, dtype=torch.float64) * 2 - 1) * 0.99
    screened = (exact + noise * (error[0] + error[1] * exact.abs())).float()
    screened[..., 39] = float("-inf")
    k = 12
    eligible = [[[p for p in positions[b, c].tolist() if 0 <= p < int(lengths[b]) and inv_norm[history[b, p]] > 0]
                 for c in range(3)] for b in range(2)]
    nothing_left_out = torch.full((2, 3), float("-inf"))
    scores, top, proven, all_proven = native.rescore_topk(
        table, inv_norm, unit_cands, history, lengths, screened, positions, nothing_left_out, k, error, threads=2
    )
    assert proven.all() and all_proven  # nothing was left out of the screen
    for b in range(2):
        for c in range(3):
            pos = eligible[b][c]
            value = {p: float(unit_cands[b, c].double() @ rows[history[b, p]] * inv_norm.double()[history[b, p]]) for p in pos}
            expected = sorted(pos, key=lambda p: (value[p], p), reverse=True)[:k]
            got = top[b, c][top[b, c] >= 0].tolist()
            assert len(got) == min(k, len(pos))
            # Positions may swap only where float32 rounding makes cosines equal.
            torch.testing.assert_close(scores[b, c, : len(got)].double(), torch.tensor([value[p] for p in expected]).double(), atol=2e-6, rtol=0)
            assert (scores[b, c, : len(got)].diff() <= 0).all()
            assert (scores[b, c, len(got):] == float("-inf")).all() and (top[b, c, len(got):] == -1).all()
            if 70 < int(lengths[b]) and history[b, 70] != 0 and 20 in got:
                assert got.index(70) < got.index(20)  # equal scores: the more recent first


@needs_amx
def test_rescore_topk_with_many_survivors_sorts_them_all():
    # A regrown screen hands over thousands of survivors (past the small-list sort): the result is
    # still the exact top-k, whatever order the survivors come in.
    gen = torch.Generator().manual_seed(5)
    table = torch.nn.functional.normalize(torch.randn(700, 32, generator=gen), dim=1)
    table[0] = 0
    inv_norm = torch.where(table.norm(dim=1) > 0, 1 / table.norm(dim=1), 0)
    unit_cands = torch.nn.functional.normalize(torch.randn(1, 2, 32, generator=gen), dim=-1)
    history = torch.randperm(699, generator=gen).add(1).unsqueeze(0)  # 699 distinct items
    positions = torch.stack([torch.randperm(699, generator=gen) for _ in range(2)]).unsqueeze(0)  # [1, 2, 699]
    exact = torch.einsum("cd,cmd->cm", unit_cands[0].double(), table.double()[history[0, positions[0]]])
    screened = (exact + (torch.rand(exact.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.01).float().unsqueeze(0)
    scores, top, proven, _ = native.rescore_topk(table, inv_norm, unit_cands, history, torch.tensor([699]), screened,
                                                 positions, torch.full((1, 2), float("-inf")), 20, (0.005, 0.0))
    assert proven.all()
    for c in range(2):
        expected = positions[0, c][exact[c].argsort(descending=True)[:20]]
        assert top[0, c].tolist() == expected.tolist()


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_copies_of_an_item_tie_exactly_whichever_slot_scores_them(dtype):
    # 300 copies of one item among 400 survivors, in every slot of the eight-row batches: their
    # exact scores must be the same bits (else ties break by rounding, not recency), and 300 tied
    # at the k-th are more than the count sort takes: the 10 most recent copies come first.
    gen = torch.Generator().manual_seed(8)
    table = torch.nn.functional.normalize(torch.randn(50, 128, generator=gen), dim=1).to(dtype)
    table[0] = 0
    inv_norm = 1 / table.double().norm(dim=1).clamp_min(1e-30)
    inv_norm[0] = 0
    history = torch.randint(8, 50, (1, 400), generator=gen)
    copies = torch.randperm(400, generator=gen)[:300].sort().values
    history[0, copies] = 7
    unit_cands = torch.nn.functional.normalize(table[7:8].float() + 0.3 * torch.randn(1, 128, generator=gen), dim=1)
    positions = torch.randperm(400, generator=gen).view(1, 1, 400)
    screened = torch.einsum("d,md->m", unit_cands[0], table.float()[history[0, positions[0, 0]]]).view(1, 1, 400)
    scores, top, proven, _ = native.rescore_topk(table, inv_norm.float(), unit_cands.unsqueeze(0), history,
                                                 torch.tensor([400]), screened, positions,
                                                 torch.full((1, 1), float("-inf")), 10, (1e-3, 0.0))
    assert top[0, 0].tolist() == copies.flip(0)[:10].tolist()
    assert len(set(scores[0, 0].tolist())) == 1 and bool(proven[0, 0])


def two_screened_pairs():
    """The arguments of rescore_topk up to `bound` for one user of 199 random rows and two
    candidates, 30 survivors each, screened exactly."""
    gen = torch.Generator().manual_seed(3)
    table = torch.nn.functional.normalize(torch.randn(200, 32, generator=gen), dim=1)
    unit_cands = torch.nn.functional.normalize(torch.randn(1, 2, 32, generator=gen), dim=-1)
    history = torch.arange(1, 200).unsqueeze(0)
    positions = torch.stack([torch.randperm(199, generator=gen)[:30] for _ in range(2)]).unsqueeze(0)
    screened = torch.einsum("bcd,bcmd->bcm", unit_cands, table[history[0, positions[0]]].unsqueeze(0))
    return table, 1 / table.norm(dim=1), unit_cands, history, torch.tensor([199]), screened, positions


@needs_amx
def test_rescore_topk_proves_a_result_only_when_what_was_left_out_falls_below_the_kth():
    args, error, k = two_screened_pairs(), (1e-3, 0.0), 5
    kth = native.rescore_topk(*args, torch.full((1, 2), -1.0), k, error)[0][0, :, k - 1]
    # Candidate 0: left out at most kth - 2e-3, below the k-th even with its error; candidate 1:
    # left out at most kth - 0.5e-3, which could reach it.
    bound = torch.stack([kth[0] - 2e-3, kth[1] - 0.5e-3]).unsqueeze(0)
    _, _, proven, all_proven = native.rescore_topk(*args, bound, k, error)
    assert proven[0].tolist() == [True, False] and not all_proven  # the count of unproven pairs says so too


@needs_amx
def test_rescore_topk_takes_each_pairs_own_error():
    # As above, with an error of its own for each pair: candidate 1's left-out bound, 0.5e-3 below
    # its k-th, is ruled out by an error of 0.2e-3 but not by the call's 1e-3.
    args = two_screened_pairs()
    kth = native.rescore_topk(*args, torch.full((1, 2), -1.0), 5, (1e-3, 0.0))[0][0, :, 4]
    bound = (kth - 0.5e-3).unsqueeze(0)
    assert native.rescore_topk(*args, bound, 5, (1e-3, 0.0))[2].tolist() == [[False, False]]
    _, _, proven, _ = native.rescore_topk(*args, bound, 5, (1e-3, 0.0), pair_error=torch.tensor([[1e-3, 0.2e-3]]))
    assert proven.tolist() == [[False, True]]


@needs_amx
@copies
def test_screen_and_rescore_in_one_call_equal_the_two_calls(copy):
    screen = unit_table(3_000, 64, seed=8)
    table = screen.float()
    inv_norm = torch.where(table.norm(dim=1) > 0, 1 / table.norm(dim=1).clamp_min(1e-30), 0.0)
    gen = torch.Generator().manual_seed(8)
    history = torch.randint(0, 3_001, (2, 2_000), generator=gen)
    lengths = torch.tensor([2_000, 1_500])
    unit_cands = torch.nn.functional.normalize(torch.randn(2, 24, 64, generator=gen), dim=-1)
    int8_cands = windows = pair_error = None
    error = (0.01, 0.0)
    if copy.startswith("int8"):
        int8, int8_cands = int8_copy(screen, unit_cands, two_parts=copy == "int8x2")
        screen, pair_error = int8.rows, int8_cands.errors
        windows = 2.02 * pair_error
        error = (float(pair_error.max()), 0.0)
    two = native.screen_topk(screen, unit_cands, history, lengths, 60, 20, 2.02 * error[0], sample_every=8,
                             int8_cands=int8_cands, windows=windows)
    two = native.rescore_topk(table, inv_norm, unit_cands, history, lengths, *two[:3], 20, error, pair_error=pair_error)
    # the slots the one call leaves unwritten hold each pair's best behaviour again: read, it
    # would come out twice
    screen_out = (torch.full((2, 24, 60), 10.0), two[1][:, :, :1].repeat(1, 1, 60).contiguous(),
                  torch.empty(2, 24), torch.empty(2, dtype=torch.int64))
    one = native.screen_rescore_topk(screen, table, inv_norm, unit_cands, history, lengths, 60, 20, 2.02 * error[0],
                                     error, screen_out, sample_every=8, int8_cands=int8_cands, windows=windows,
                                     pair_error=pair_error)
    for a, b in zip(one[:3], two[:3]):
        assert torch.equal(a, b)
    assert one[3] == two[3]


@needs_amx
def test_rescore_topk_never_reads_a_survivor_that_cannot_enter():
    # Survivor 3 screens far below the others: with its error it cannot reach the k-th exact
    # score, so its row must not be read. It is poisoned (NaN, which would rank first if scored).
    table = torch.nn.functional.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(4)), dim=1)
    table[0] = 0
    unit_cands = table[1:2].unsqueeze(0).clone()  # candidate = item 1: cosines 1.0 and below
    inv_norm = torch.ones(6)
    inv_norm[0] = 0
    table[4] = float("nan")
    history = torch.tensor([[1, 2, 3, 4, 5]])
    positions = torch.tensor([[[0, 1, 2, 3]]])
    exact = (unit_cands[0, 0] @ table[[1, 2, 3]].T).tolist()
    screened = torch.tensor([[exact + [-0.9]]])
    scores, top, proven, _ = native.rescore_topk(table, inv_norm, unit_cands, history, torch.tensor([5]), screened, positions,
                                                 torch.tensor([[-0.95]]), 2, (0.01, 0.0))
    assert 3 not in top[0, 0].tolist() and torch.isfinite(scores).all()
    assert top[0, 0, 0] == 0 and bool(proven[0, 0])


@needs_amx
def test_an_int8_screen_needs_its_quantised_candidates():
    screen = torch.zeros(10, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8_cands"):
        native.screen_topk(screen, torch.zeros(1, 2, 32), torch.ones(1, 5, dtype=torch.int64), torch.tensor([5]), 3, 3, 1.0)


@needs_amx
def test_the_pieces_of_a_split_user_start_from_their_pooled_sample(monkeypatch):
    # 4 copies of the candidate's item among the sampled rows of each of two pieces: the 8th
    # best of either piece's own sample is a random row, but that of the pooled sample is the
    # copies' score, and both pieces start a window below it: only the copies are kept.
    monkeypatch.setattr(native, "MIN_SPLIT_ROWS", 1_024)
    screen = unit_table(5_000, 128, seed=8)
    history, unit_cands = sampled_copies_history(screen, 4_096, every=50, copies=4)
    copies = [0, 50, 100, 150, 2_048, 2_098, 2_148, 2_198]  # the second piece starts at row 2,048
    history[0, 2_048:2_200:50] = 1
    scores, positions, bound, _ = native.screen_topk(screen, unit_cands, history, torch.tensor([4_096]), 150, 50,
                                                     0.01, sample_every=50, threads=2)
    kept = positions[0, 0][positions[0, 0] >= 0]
    assert sorted(kept.tolist()) == copies
    assert 0.98 < float(bound[0, 0]) < float(scores[0, 0, : len(kept)].min())


def test_the_sample_rank_bounds_the_chance_of_a_failed_proof():
    # The rank r: more than r - 1 of a candidate's k - 1 best are sampled (binomial) with
    # probability at most SAMPLE_FAILURE, and r - 1 would not do.
    for k, every in ((50, 50), (16, 16), (200, 200), (50, 10)):
        r = native.sample_rank(k, every)
        p = 1 / every
        tail = lambda r: sum(math.comb(k - 1, j) * p**j * (1 - p) ** (k - 1 - j) for j in range(r, k))
        assert tail(r) <= native.SAMPLE_FAILURE < tail(r - 1)
    assert native.sample_rank(50, 50) == 8
    with pytest.raises(ValueError, match="one row in 2 for k = 1000"):
        native.sample_rank(1_000, 2)


def test_short_histories_are_sampled_densely_long_ones_one_row_in_k():
    bf16_row, c = 128 * 2, native.MIN_SAMPLED_CANDIDATES
    assert native.sampled_start(50, c, 1_000, bf16_row) == 10  # 256 KB of rows, 100 sampled
    assert native.sampled_start(50, c, 100_000, bf16_row) == 50  # 25.6 MB: re-read from memory
    assert native.sampled_start(50, c, 16_384, bf16_row) == 10 and native.sampled_start(50, c, 16_385, bf16_row) == 50
    assert native.sampled_start(50, c, 479, bf16_row) == 50  # 47 dense rows: too few to pay
    assert native.sampled_start(50, c, 480, bf16_row) == 10
    assert native.sampled_start(100, c, 1_000, bf16_row) == 20
    assert native.sampled_start(50, c - 1, 1_000, bf16_row) == 0 and native.sampled_start(8, c, 1_000, bf16_row) == 0
    for k in (16, 50, 100, 1_000):  # every dense sample's rank fits the sampled bests kept
        assert 1 <= native.sample_rank(k, k // native.DENSE_SAMPLE_PER_K) < native.SAMPLE_VALUES


@needs_amx
def test_the_bf16_tile_operand_is_torchs_rounding_zero_padded():
    gen = torch.Generator().manual_seed(12)
    unit_cands = torch.nn.functional.normalize(torch.randn(3, 21, 40, generator=gen), dim=-1)
    unit_cands[1, 4] = 0
    padded, cand_pad = native._padded_candidates(unit_cands)
    assert cand_pad == 32 and padded.shape == (3, 32, 64)
    assert torch.equal(padded[:, :21, :40], unit_cands.to(torch.bfloat16))
    assert not padded[:, 21:].any() and not padded[:, :, 40:].any()


@needs_amx
def test_the_native_id_range_is_torchs_min_and_max():
    gen = torch.Generator().manual_seed(13)
    for n in (1, 7, 8, 9, 1_000, 100_003):
        ids = torch.randint(-(2**40), 2**40, (n,), generator=gen)
        assert native.id_range(ids) == tuple(int(v) for v in torch.aminmax(ids))
    with pytest.raises(ValueError, match="contiguous int64"):
        native.id_range(torch.arange(10)[::2])
