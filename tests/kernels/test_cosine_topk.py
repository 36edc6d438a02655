"""kernels.cosine_topk: the reference and the CPU fast path against the contract and each other."""
from __future__ import annotations

import pytest
import torch

import kernels
import kernels.cpu_topk as cpu_topk
from kernels import cosine_topk, native
from kernels.cosine_topk import jagged_to_padded
from kernels.reference import cosine_topk_reference
from kernels.scratch import drop_scratch
from topk_checks import assert_valid_topk, make_table, sampled_copies_history

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


@pytest.fixture(autouse=True, params=["torch-screen", "native-screen", "int8-screen"])
def screen_kind(request, monkeypatch):
    """Every test runs with the torch screen, with the fused native screen from the bf16 copy, and
    with it from the int8 copy for every history (where they can run); "native-screen" keeps the
    default choice between the two copies."""
    if request.param != "torch-screen":
        if request.node.get_closest_marker("torch_screen_only"):
            pytest.skip("checks the torch screen's own selection")
        if not native.available():
            pytest.skip(f"native screen unavailable here: {native.unavailable_reason()}")
        if request.param == "int8-screen" and not native.int8_available():
            pytest.skip("this CPU has no AMX-INT8")
    monkeypatch.setattr(cpu_topk, "USE_NATIVE", request.param != "torch-screen")
    if request.param == "int8-screen":
        monkeypatch.setattr(cpu_topk, "INT8_MIN_LENGTH", 0)
        monkeypatch.setattr(cpu_topk, "INT8_MIN_ROWS_PER_CANDIDATE", 0)
    return request.param


@pytest.fixture
def force_screen(monkeypatch):
    """Lets the bfloat16 screen run on histories too short for it to be chosen by default."""
    monkeypatch.setattr(cpu_topk, "EXACT_MAX_LENGTH_PER_KEPT", 1)


def random_batch(n_items, batch, width, n_cands, lengths, seed=0, pad_prob=0.0):
    gen = torch.Generator().manual_seed(seed)
    history = torch.randint(1, n_items + 1, (batch, width), generator=gen)
    if pad_prob:  # unknown items (id 0) inside the history
        history[torch.rand(batch, width, generator=gen) < pad_prob] = 0
    lengths = torch.tensor(lengths)
    history[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    candidates = torch.randint(1, n_items + 1, (batch, n_cands), generator=gen)
    return candidates, history, lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n_cands", "strategy"), [(1, "exact"), (9, "exact"), (9, "screen"), (9, "screen-sliced")])
def test_cpu_matches_reference(dtype, n_cands, strategy, monkeypatch):
    # The exact strategy, and the bfloat16 screen (forced here), re-scoring in one slice or in
    # many; widths not multiples of anything.
    if strategy.startswith("screen"):
        monkeypatch.setattr(cpu_topk, "EXACT_MAX_LENGTH_PER_KEPT", 1)
    if strategy == "screen-sliced":
        monkeypatch.setattr(cpu_topk, "EXACT_SLICE_ROWS", 7)
    table = make_table(400, 24, dtype)
    candidates, history, lengths = random_batch(400, 4, 333, n_cands, [333, 0, 17, 250], pad_prob=0.05)
    k = 20
    ref = cosine_topk_reference(table, candidates, history, lengths, k)
    fast = cosine_topk(table, candidates, history, lengths, k, impl="cpu")
    for scores, positions in (ref, fast):
        assert_valid_topk(table, candidates, history, lengths, k, scores, positions)
    # Random rows are well separated: the fast path picks exactly the reference positions.
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_cands", [1, 9])
def test_the_table_is_never_modified(dtype, n_cands, force_screen):
    # Preparing the normalised copy and scoring read the table; a float32 table is used as it is
    # (no conversion copy), so an in-place step on it would corrupt the caller's embeddings.
    table = make_table(300, 24, dtype)
    before = table.clone()
    candidates, history, lengths = random_batch(300, 2, 120, n_cands, [120, 60])
    cosine_topk(table, candidates, history, lengths, 10)
    cosine_topk(table, candidates, history, lengths, 10)
    assert torch.equal(table, before)


@pytest.mark.parametrize("n_cands", [1, 9])
def test_calls_inside_and_outside_inference_mode_share_buffers(n_cands, force_screen):
    # The reusable buffers outlive the call: one made under inference_mode must stay writable.
    table = make_table(300, 24, torch.float16)
    candidates, history, lengths = random_batch(300, 2, 120, n_cands, [120, 60])
    drop_scratch()  # this thread's buffers are then made inside inference mode
    with torch.inference_mode():
        inside = cosine_topk(table, candidates, history, lengths, 10)
    outside = cosine_topk(table, candidates, history, lengths, 10)
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))


def test_per_chunk_normalisation_matches_the_prepared_copy(monkeypatch, force_screen):
    # Tables too large for a bfloat16 copy are normalised chunk by chunk instead.
    table = make_table(400, 24, torch.float16)
    candidates, history, lengths = random_batch(400, 3, 150, 9, [150, 80, 0], pad_prob=0.05)
    prepared = cosine_topk(table, candidates, history, lengths, 10)
    monkeypatch.setattr(cpu_topk, "SCREEN_COPY_MAX_ELEMENTS", 0)
    per_chunk = cosine_topk(table, candidates, history, lengths, 10)
    assert torch.equal(prepared[1], per_chunk[1])
    # The native path re-scores in its own summation order: equal up to float32 rounding.
    torch.testing.assert_close(prepared[0], per_chunk[0], atol=2e-6, rtol=0)


def test_a_prepared_table_builds_nothing_on_its_first_call(monkeypatch):
    # prepare_table builds the per-table copies ahead: the first call only reads them
    table = make_table(300, 32, torch.float16)
    candidates, history, lengths = random_batch(300, 1, 2_000, 1, [2_000])  # few candidates, long: int8 where it runs
    assert kernels.prepare_table(table)
    for name in ("empty_huge", "build_int8_screen"):
        monkeypatch.setattr(cpu_topk, name, lambda *a, **k: pytest.fail("built again on the first call"))
    scores, positions = cosine_topk(table, candidates, history, lengths, 10)
    expected = cosine_topk_reference(table, candidates, history, lengths, 10)
    assert torch.equal(positions, expected[1])
    with torch.inference_mode():
        assert not kernels.prepare_table(make_table(10, 8))  # nothing can be kept for it


def test_two_tables_in_turn_keep_their_prepared_copies(monkeypatch):
    # A model reload serves from a new table while the old one still answers: neither is rebuilt.
    old, new, third = (make_table(200, 16, torch.float16) for _ in range(3))
    candidates, history, lengths = random_batch(200, 1, 300, 9, [300])
    assert kernels.prepare_table(old) and kernels.prepare_table(new)
    built = []
    real_empty_huge = cpu_topk.empty_huge
    monkeypatch.setattr(cpu_topk, "empty_huge", lambda *a, **k: built.append(1) or real_empty_huge(*a, **k))
    for table in (old, new, old, new):
        cosine_topk(table, candidates, history, lengths, 5)
    assert built == []
    cosine_topk(third, candidates, history, lengths, 5)  # a third displaces the least recent (old)
    cosine_topk(new, candidates, history, lengths, 5)
    assert len(built) == 1
    cosine_topk(old, candidates, history, lengths, 5)
    assert len(built) == 2


def test_prepared_copy_follows_in_place_edits_of_the_table(force_screen):
    table = make_table(100, 16)
    candidates, history, lengths = random_batch(100, 1, 60, 9, [60])
    cosine_topk(table, candidates, history, lengths, 5)
    edited = history[0, 7]
    table[edited] = table[candidates[0, 0]]  # now the best match of candidate 0
    scores, positions = cosine_topk(table, candidates, history, lengths, 5)
    assert history[0, positions[0, 0, 0]] == edited and scores[0, 0, 0] == pytest.approx(1.0, abs=1e-6)


def test_slices_narrower_than_k(monkeypatch):
    # Many users in one block make the exact strategy's row slices narrower than k.
    monkeypatch.setattr(cpu_topk, "EXACT_SLICE_ROWS", 40)
    table = make_table(300, 8)
    candidates, history, lengths = random_batch(300, 10, 90, 2, [90, 7, 0, 45, 90, 60, 3, 89, 30, 11], pad_prob=0.1)
    ref = cosine_topk_reference(table, candidates, history, lengths, 12)
    fast = cosine_topk(table, candidates, history, lengths, 12, impl="cpu")
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


def test_small_budgets_force_many_chunks_and_blocks(monkeypatch):
    monkeypatch.setattr(cpu_topk, "SCORE_BUDGET", 256)
    monkeypatch.setattr(cpu_topk, "SCREEN_SCORE_BUDGET", 256)
    monkeypatch.setattr(cpu_topk, "ROW_BUDGET", 512)
    monkeypatch.setattr(cpu_topk, "EXACT_SLICE_ROWS", 64)
    table = make_table(300, 8)
    candidates, history, lengths = random_batch(300, 5, 201, 3, [201, 64, 0, 1, 150], pad_prob=0.1)
    ref = cosine_topk_reference(table, candidates, history, lengths, 6)
    for screen in (True, False):
        fast = cpu_topk.cosine_topk_cpu(table, candidates, history, lengths, 6, screen=screen)
        assert torch.equal(fast[1], ref[1])
        torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


def test_users_longest_first_in_many_blocks_are_written_in_place(monkeypatch):
    # Sorted users make runs of rows: the fused screen's blocks write straight into the output,
    # and the users without behaviours at the end are filled apart.
    monkeypatch.setattr(cpu_topk, "SCREEN_SCORE_BUDGET", 256)
    monkeypatch.setattr(cpu_topk, "ROW_BUDGET", 512)
    monkeypatch.setattr(cpu_topk, "FUSED_KEPT_BUDGET", 3 * 18 * 2)  # two users a block (k = 6: 18 kept)
    table = make_table(300, 8)
    candidates, history, lengths = random_batch(300, 7, 201, 3, [201, 150, 150, 64, 9, 0, 0], pad_prob=0.1)
    ref = cosine_topk_reference(table, candidates, history, lengths, 6)
    fast = cpu_topk.cosine_topk_cpu(table, candidates, history, lengths, 6, screen=True)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)
    assert (fast[1][5:] == -1).all() and (fast[0][5:] == float("-inf")).all()


def test_fused_blocks_take_users_down_to_a_floor_within_a_budget():
    lengths = [100, 80, 51, 50, 49, 0]
    assert cpu_topk._fused_block_users(lengths, 0, 50, 10) == 3  # 100, 80, 51: above the floor
    assert cpu_topk._fused_block_users(lengths, 0, 50, 2) == 2  # the budget's cap
    assert cpu_topk._fused_block_users(lengths, 3, 25, 10) == 2  # 50, 49
    assert cpu_topk._fused_block_users(lengths, 4, 60, 0) == 1  # always one


def fused_block_calls(monkeypatch, screen_kind, lengths):
    """A runner for 6 users of the given lengths (2 candidates, k = 5): each run checks the result
    against the reference and returns how many fused screens it took."""
    if screen_kind == "torch-screen":
        pytest.skip("the block plan of the fused screen")
    table = make_table(400, 16)
    candidates, history, lengths = random_batch(400, 6, 300, 2, lengths, pad_prob=0.05)
    ref = cosine_topk_reference(table, candidates, history, lengths, 5)
    calls = count_calls(monkeypatch, "screen_rescore_topk", owner=native)

    def run() -> int:
        calls.clear()
        fast = cpu_topk.cosine_topk_cpu(table, candidates, history, lengths, 5)
        assert torch.equal(fast[1], ref[1])
        torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)
        return len(calls)

    return run


def test_the_fused_screen_takes_a_batch_of_similar_users_in_one_call(monkeypatch, screen_kind, force_screen):
    run = fused_block_calls(monkeypatch, screen_kind, [300, 290, 260, 200, 151, 140])
    assert run() == 2  # users down to half the longest (151 > 150), then the last one
    kept = 15 * (cpu_topk.INT8_KEEP_FACTOR if screen_kind == "int8-screen" else 1)  # k + 2k, x3 from int8
    monkeypatch.setattr(cpu_topk, "FUSED_KEPT_BUDGET", 2 * 2 * kept)  # at most two users a block
    assert run() == 3  # 300, 290 | 260, 200 | 151, 140


def test_users_out_of_order_are_gathered_into_fused_blocks_within_a_budget(monkeypatch, screen_kind, force_screen):
    run = fused_block_calls(monkeypatch, screen_kind, [200, 300, 151, 290, 140, 260])
    assert run() == 2  # longest first, as above
    monkeypatch.setattr(cpu_topk, "FUSED_GATHER_BUDGET", 2 * 300)  # two users' histories a block
    assert run() == 3  # 300, 290 | 260, 200 | 151, 140


def near_tie_case():
    # 60 rows within 1e-3 of one direction: their cosines to another vector differ by ~1e-4, which
    # bfloat16 cannot order, so a narrow screen cannot prove its survivors complete.
    gen = torch.Generator().manual_seed(3)
    base, target = torch.nn.functional.normalize(torch.randn(2, 16, generator=gen), dim=1)
    rows = torch.nn.functional.normalize(base + 1e-3 * torch.randn(60, 16, generator=gen), dim=1)
    table = torch.cat([torch.zeros(1, 16), target[None], rows])
    history = torch.arange(2, 62).flip(0).unsqueeze(0)
    return table, torch.ones(1, 8, dtype=torch.int64), history, torch.tensor([60])


def count_calls(monkeypatch, name, owner=cpu_topk):
    calls = []
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


def test_near_ties_beyond_bf16_precision_widen_the_screen(monkeypatch, force_screen, screen_kind):
    table, candidates, history, lengths = near_tie_case()
    widens = count_calls(monkeypatch, "widen", cpu_topk._Screener)
    fast = cpu_topk.cosine_topk_cpu(table, candidates, history, lengths, 10, screen=True, margin=4)
    # the first screen (14 survivors) could not prove itself; one more pass did (the int8 screen,
    # regrown, keeps INT8_KEEP_FACTOR x 56 survivors: all 60 rows, proven without a pass)
    assert len(widens) == (0 if screen_kind == "int8-screen" else 1)
    ref = cosine_topk_reference(table, candidates, history, lengths, 10)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


def near_ties_among_far_rows():
    """near_tie_case's 60 near-tied rows after 200 rows far from the candidate (L = 260)."""
    table, candidates, history, lengths = near_tie_case()
    gen = torch.Generator().manual_seed(8)
    far = torch.nn.functional.normalize(torch.randn(200, 16, generator=gen), dim=1)
    far = far - (far @ table[1]).clamp_min(0).unsqueeze(1) * table[1]  # nothing close to the candidate
    table = torch.cat([table, torch.nn.functional.normalize(far, dim=1)])
    history = torch.cat([torch.arange(62, 262), history[0]]).unsqueeze(0)
    return table, candidates, history, torch.tensor([260])


@pytest.mark.torch_screen_only
def test_torch_screen_scores_stay_within_the_measured_error():
    # bf16-rounded matmul scores of the prepared copy against exact cosines of the float16 table,
    # for random rows and heavy-tailed rows (a few large components: larger rounding).
    gen = torch.Generator().manual_seed(9)
    for rows in (torch.randn(3_000, 128, generator=gen), torch.randn(3_000, 128, generator=gen).pow(3)):
        table = torch.cat([torch.zeros(1, 128), rows]).half()
        screener = cpu_topk._Screener(table, cpu_topk._table_prep(table))
        unit_cands = torch.nn.functional.normalize(table[torch.randint(1, 3_001, (1, 40), generator=gen)].float(), dim=-1)
        history = torch.arange(1, 3_001).unsqueeze(0)
        cands = unit_cands.transpose(1, 2).to(torch.bfloat16).contiguous()
        scores, _ = screener._chunk_scores(cands, history, torch.tensor([3_000]), 0)
        screened = scores[0].double()  # [3000, 40]
        exact = torch.nn.functional.normalize(table[1:].double(), dim=1) @ unit_cands[0].double().T
        absolute, relative = screener.error(unit_cands, rounded=True)
        assert ((screened - exact).abs() <= absolute + relative * screened.abs()).all()
        assert absolute < 0.8 * cpu_topk.screen_error_bound(128)[0]  # tighter than the worst case


@pytest.mark.torch_screen_only
def test_widening_keeps_every_behaviour_the_bound_cannot_rule_out(monkeypatch, force_screen):
    # With no margin at all, the k-th exact score found first bounds the rest: the single extra
    # pass must re-score all 60 near-tied rows and none of the 200 far ones.
    table, candidates, history, lengths = near_ties_among_far_rows()
    rescored = []
    exact_scores = cpu_topk._exact_scores
    monkeypatch.setattr(cpu_topk, "_exact_scores", lambda t, p, c, ids: rescored.append(ids.shape[-1]) or exact_scores(t, p, c, ids))
    fast = cpu_topk.cosine_topk_cpu(table, candidates, history, lengths, 10, screen=True, margin=0)
    assert rescored[-1] == 60
    ref = cosine_topk_reference(table, candidates, history, lengths, 10)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


@pytest.mark.torch_screen_only
def test_grouped_selection_matches_reference(monkeypatch):
    # Long chunks select through group maxima; lower the threshold so a small input takes that path.
    monkeypatch.setattr(cpu_topk, "GROUPED_MIN_WIDTH_PER_KEPT", 1)
    table = make_table(2000, 16, torch.float16)
    candidates, history, lengths = random_batch(2000, 2, 1024, 9, [1024, 700], pad_prob=0.02)
    grouped = []
    chunk_topk = cpu_topk._chunk_topk
    monkeypatch.setattr(cpu_topk, "_chunk_topk", lambda s, keep: grouped.append(s.shape[1]) or chunk_topk(s, keep))
    fast = cpu_topk.cosine_topk_cpu(table, candidates, history, lengths, 8, margin=8)
    ref = cosine_topk_reference(table, candidates, history, lengths, 8)
    assert grouped[0] == 1024
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


@pytest.mark.torch_screen_only
@pytest.mark.parametrize("groups", [2, 8])
def test_level_by_level_selection_keeps_the_largest_values(monkeypatch, groups):
    # Many ties (values drawn from 50 levels), widths that stop the recursion at each depth, and
    # lengths that leave rows outside the last whole group.
    monkeypatch.setattr(cpu_topk, "SELECTION_GROUPS", groups)
    monkeypatch.setattr(cpu_topk, "GROUPED_MIN_WIDTH_PER_KEPT", 1)
    gen = torch.Generator().manual_seed(5)
    for m, keep in [(4096, 10), (4096, 300), (1000, 7), (4103, 9), (64, 64)]:
        values = torch.randint(-25, 25, (3, 5, m), generator=gen).to(torch.int16)
        picked = cpu_topk._top_indices(values, keep)
        assert picked.shape == (3, 5, keep)
        assert (picked.sort(-1).values.diff(dim=-1) > 0).all()  # distinct positions
        chosen = values.gather(-1, picked).sort(-1).values
        assert torch.equal(chosen, values.topk(keep, dim=-1).values.sort(-1).values)


@pytest.mark.torch_screen_only
def test_grouped_selection_with_only_negative_similarities_falls_back(monkeypatch):
    # Negative bf16 scores do not order like their int16 bits: the grouped screen must not be trusted.
    monkeypatch.setattr(cpu_topk, "GROUPED_MIN_WIDTH_PER_KEPT", 1)
    gen = torch.Generator().manual_seed(4)
    base = torch.nn.functional.normalize(torch.randn(1, 16, generator=gen), dim=1)
    rows = torch.nn.functional.normalize(base + 0.3 * torch.randn(512, 16, generator=gen), dim=1)
    table = torch.cat([torch.zeros(1, 16), -base, rows])  # item 1 points away from every row
    history = torch.arange(2, 514).unsqueeze(0)
    candidates = torch.ones(1, 8, dtype=torch.int64)
    lengths = torch.tensor([512])
    widens = count_calls(monkeypatch, "widen", cpu_topk._Screener)
    fast = cpu_topk.cosine_topk_cpu(table, candidates, history, lengths, 5, margin=3)
    assert len(widens) == 1
    ref = cosine_topk_reference(table, candidates, history, lengths, 5)
    assert torch.equal(fast[1], ref[1])


@pytest.mark.parametrize("impl", ["reference", "cpu", "cpu-screened"])
def test_ties_go_to_the_most_recent_duplicate(impl, monkeypatch):
    if impl == "cpu-screened":
        monkeypatch.setattr(cpu_topk, "EXACT_MAX_LENGTH_PER_KEPT", 0)
        monkeypatch.setattr(cpu_topk, "BF16_MIN_CANDIDATES", 1)
        impl = "cpu"
    table = make_table(20, 8)
    history = torch.tensor([[5, 7, 5, 5, 9, 5, 0, 0]])
    candidates = torch.tensor([[5, 9]])
    scores, positions = cosine_topk(table, candidates, history, torch.tensor([6]), 3, impl=impl)
    assert positions[0, 0].tolist() == [5, 3, 2]
    torch.testing.assert_close(scores[0, 0], torch.ones(3), atol=1e-6, rtol=0)
    assert positions[0, 1, 0] == 4


@pytest.mark.parametrize("n_cands", [1, 9])
def test_a_tie_longer_than_the_float_preselection_keeps_the_most_recent(n_cands):
    # 20 copies of the target among 60 behaviours: the tie at the k-th score runs past the
    # float top-(k + 8) that is packed first, so those rows are packed whole.
    table = make_table(100, 16)
    history = torch.randint(2, 101, (1, 60), generator=torch.Generator().manual_seed(6))
    copies = torch.arange(1, 60, 3)
    history[0, copies] = 1
    candidates = torch.ones(1, n_cands, dtype=torch.int64)
    scores, positions = cosine_topk(table, candidates, history, torch.tensor([60]), 4, impl="cpu")
    assert (positions[0] == copies.flip(0)[:4]).all()
    assert torch.equal(positions, cosine_topk_reference(table, candidates, history, torch.tensor([60]), 4)[1])


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_fewer_valid_than_k_and_empty_rows(impl):
    table = make_table(50, 8)
    table[7] = 0  # an item without an embedding
    history = torch.tensor([[3, 0, 7, 4, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    lengths = torch.tensor([5, 4, 0])  # row 1: padding only; row 2: empty
    candidates = torch.tensor([[3, 4], [3, 4], [3, 4]])
    scores, positions = cosine_topk(table, candidates, history, lengths, 4, impl=impl)
    assert_valid_topk(table, candidates, history, lengths, 4, scores, positions)
    assert sorted(positions[0, 0, :2].tolist()) == [0, 3]
    assert (positions[0, :, 2:] == -1).all() and (positions[1:] == -1).all()
    assert torch.isneginf(scores[1:]).all()


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_zero_candidate_row_takes_the_most_recent(impl):
    table = make_table(30, 8)
    history = torch.tensor([[4, 5, 6, 7, 8]])
    scores, positions = cosine_topk(table, torch.tensor([[0]]), history, torch.tensor([5]), 3, impl=impl)
    assert positions[0, 0].tolist() == [4, 3, 2]
    assert (scores == 0).all()


def test_jagged_equals_padded():
    table = make_table(100, 16)
    candidates, history, lengths = random_batch(100, 3, 40, 4, [40, 0, 25])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = history[torch.arange(40)[None, :] < lengths[:, None]]
    padded, jagged_lengths = jagged_to_padded(values, offsets)
    assert torch.equal(jagged_lengths, lengths) and torch.equal(padded, history)
    jagged = cosine_topk(table, candidates, values, k=10, offsets=offsets)
    assert all(torch.equal(a, b) for a, b in zip(jagged, cosine_topk(table, candidates, history, lengths, 10)))


def test_lengths_default_to_full_rows():
    table = make_table(60, 8)
    candidates, history, _ = random_batch(60, 2, 12, 2, [12, 12])
    full = torch.tensor([12, 12])
    assert torch.equal(cosine_topk(table, candidates, history, k=5)[1], cosine_topk(table, candidates, history, full, 5)[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"history": torch.tensor([[1, 99]])}, "history` holds ids outside"),
        # a long history is checked in one native pass where the native kernels run
        ({"history": torch.tensor([[1] * 9_000 + [-1]]), "lengths": torch.tensor([9_001])}, "history` holds ids outside.*min -1"),
        ({"history": torch.tensor([[1] * 9_000 + [99]]), "lengths": torch.tensor([9_001])}, "history` holds ids outside.*max 99"),
        ({"candidates": torch.tensor([[1], [2]])}, "candidates` must be"),
        ({"lengths": torch.tensor([3])}, "lengths` must lie"),
        ({"table": torch.zeros(10, 4, dtype=torch.int32)}, "table` must be"),
        ({"k": 0}, "`k` must be"),
        ({"impl": "gpu"}, "impl must be"),
    ],
)
def test_errors_name_the_argument(kwargs, message):
    args = {"table": make_table(10, 4), "candidates": torch.tensor([[1]]), "history": torch.tensor([[1, 2]]),
            "lengths": torch.tensor([2]), "k": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        cosine_topk(**args)


def test_bad_offsets_are_rejected():
    with pytest.raises(ValueError, match="offsets"):
        cosine_topk(make_table(10, 4), torch.tensor([[1]]), torch.tensor([1, 2]), k=1, offsets=torch.tensor([0, 3]))


def test_the_fused_screen_regrows_its_survivors_before_widening(monkeypatch, screen_kind, force_screen):
    # 10 survivors cannot prove 60 near-ties; 40 cannot either; 160 can (the far rows fall below
    # the bound), so the torch widening is never needed.
    if screen_kind == "torch-screen":
        pytest.skip("the regrowth is the fused screen's")
    table, candidates, history, lengths = near_ties_among_far_rows()
    screens = count_calls(monkeypatch, "screen_rescore_topk", native)
    widens = count_calls(monkeypatch, "widen", cpu_topk._Screener)
    fast = cpu_topk.cosine_topk_cpu(table, candidates, history, lengths, 10, screen=True, margin=0)
    # (the int8 screen keeps INT8_KEEP_FACTOR x as many: 30 cannot, 120 can)
    assert len(screens) == (2 if screen_kind == "int8-screen" else 3) and not widens
    ref = cosine_topk_reference(table, candidates, history, lengths, 10)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


def test_an_unlucky_sample_fails_the_proof_and_is_screened_again_without_one(monkeypatch, screen_kind):
    # The first screen starts its thresholds from a sample whose best are only the copies of the
    # candidates' item, as many as the rank it starts from (see test_native_screen): so few
    # survivors cannot prove a top-50; the same candidates are screened again, from -inf, and the
    # result is exact.
    if screen_kind == "torch-screen":
        pytest.skip("the sampled start is the fused screen's")
    table = make_table(5_000, 128, torch.float32)
    every = native.sampled_start(50, native.MIN_SAMPLED_CANDIDATES, 4_000, 128 * 2)  # bf16 rows: a dense sample
    history, _ = sampled_copies_history(table, 4_000, every=every, copies=native.sample_rank(50, every))
    candidates, lengths = torch.ones(1, native.MIN_SAMPLED_CANDIDATES, dtype=torch.int64), torch.tensor([4_000])
    samples = []
    original = native.screen_rescore_topk
    monkeypatch.setattr(native, "screen_rescore_topk", lambda *a, **kw: samples.append(kw["sample_every"]) or original(*a, **kw))
    fast = cosine_topk(table, candidates, history, lengths, 50, impl="cpu")
    assert samples == [every, 0]
    ref = cosine_topk_reference(table, candidates, history, lengths, 50)
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_candidate_vectors_share_the_bf16_copys_arithmetic(dtype):
    # Candidates are table rows times the prepared reciprocal norms, the arithmetic of the bf16
    # copy: rounded to bf16 they are its rows bit for bit, and the rounding error reported for
    # them is the one measured for those rows at preparation. Zero rows (id 0) stay zero.
    table = make_table(500, 24, dtype)
    prep = cpu_topk._table_prep(table)
    candidates = torch.randint(0, 501, (3, 7), generator=torch.Generator().manual_seed(3))
    candidates[0, 0] = 0
    unit, cand_error = cpu_topk._unit_candidates(table, prep, candidates)
    assert unit.shape == (3, 7, 24) and unit.dtype == torch.float32
    assert torch.equal(unit.bfloat16(), prep.screen[candidates])
    assert (unit[0, 0] == 0).all()
    measured = float((unit.bfloat16().float() - unit).norm(dim=-1).max())
    assert cand_error == pytest.approx(measured, rel=1e-5)
    expected = torch.nn.functional.normalize(table[candidates].float(), dim=-1)
    torch.testing.assert_close(unit, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_short_histories_with_many_candidates_match_the_reference(dtype):
    # 40 candidates x k = 10 survivors cover histories of 200-300 rows: the fused path reads each
    # such history whole before re-scoring its pairs; lengths differ, with padding and id 0 inside.
    table = make_table(2_000, 32, dtype)
    candidates, history, lengths = random_batch(2_000, 3, 300, 40, [300, 200, 257], seed=4, pad_prob=0.05)
    fast = cosine_topk(table, candidates, history, lengths, 10, impl="cpu")
    ref = cosine_topk_reference(table, candidates, history, lengths, 10)
    assert_valid_topk(table, candidates, history, lengths, 10, fast[0], fast[1])
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


def test_densely_sampled_histories_match_the_reference(monkeypatch, screen_kind):
    # Histories short enough for a dense sample (one row in k / 5), with enough candidates to
    # sample at all: the start from it is still exact, ties and duplicates included.
    table = make_table(3_000, 64, torch.float16)
    candidates, history, lengths = random_batch(3_000, 3, 1_200, native.MIN_SAMPLED_CANDIDATES, [1_200, 700, 1_000], seed=9)
    history[0, 100:400:3] = history[0, 50]  # copies of one item across the sampled rows
    samples = []
    original = native.screen_rescore_topk
    monkeypatch.setattr(native, "screen_rescore_topk", lambda *a, **kw: samples.append(kw["sample_every"]) or original(*a, **kw))
    fast = cosine_topk(table, candidates, history, lengths, 50, impl="cpu")
    if screen_kind == "native-screen":
        assert samples[0] == 50 // native.DENSE_SAMPLE_PER_K
    ref = cosine_topk_reference(table, candidates, history, lengths, 50)
    assert_valid_topk(table, candidates, history, lengths, 50, fast[0], fast[1])
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


def test_the_int8_copy_screens_long_histories_with_few_candidates(monkeypatch, screen_kind):
    # The default choice: at least INT8_MIN_LENGTH rows, and one candidate or
    # INT8_MIN_ROWS_PER_CANDIDATE rows per candidate, go to the int8 copy, the rest to the bf16
    # copy; both exact.
    if screen_kind != "native-screen" or not native.int8_available():
        pytest.skip("the choice between the fused screen's copies")
    monkeypatch.setattr(cpu_topk, "INT8_MIN_LENGTH", 1_000)
    monkeypatch.setattr(cpu_topk, "INT8_MIN_ROWS_PER_CANDIDATE", 500)
    table = make_table(5_000, 32, torch.float16)
    copies = []
    original = native.screen_rescore_topk
    monkeypatch.setattr(native, "screen_rescore_topk", lambda screen, *a, **kw: copies.append(screen.dtype) or original(screen, *a, **kw))
    for width, n_cands, expected in ((1_200, 3, torch.bfloat16), (1_200, 2, torch.int8), (1_200, 1, torch.int8),
                                     (900, 1, torch.bfloat16)):
        candidates, history, lengths = random_batch(5_000, 2, width, n_cands, [width, width - 100], seed=n_cands)
        fast = cosine_topk(table, candidates, history, lengths, 10, impl="cpu")
        assert copies[-1] == expected
        # the int8 copy is built by the first call that screens from it, not before
        assert (cpu_topk._table_prep(table).int8 is not None) == (torch.int8 in copies)
        ref = cosine_topk_reference(table, candidates, history, lengths, 10)
        assert torch.equal(fast[1], ref[1])
        torch.testing.assert_close(fast[0], ref[0], atol=2e-6, rtol=0)


def test_each_screen_takes_the_error_of_its_own_arithmetic(monkeypatch, screen_kind, force_screen):
    # The torch screen's matmul rounds scores to bf16 (a relative error term); the fused screen
    # returns float32 sums (none): a proof with the wrong one could call an incomplete result exact.
    asked = []
    original = cpu_topk._Screener.error
    monkeypatch.setattr(cpu_topk._Screener, "error", lambda self, cands, rounded: asked.append(rounded) or original(self, cands, rounded))
    table = make_table(400, 24, torch.float32)
    candidates, history, lengths = random_batch(400, 2, 300, 9, [300, 250])
    cosine_topk(table, candidates, history, lengths, 10, impl="cpu")
    if screen_kind == "int8-screen":
        assert asked == []  # the int8 screen's error comes from kernels.int8_screen
    else:
        assert asked and all(rounded == (screen_kind == "torch-screen") for rounded in asked)


def test_an_unknown_item_is_never_chosen_whatever_row_0_holds(force_screen):
    # Row 0 of the table should be zero, but a table whose row 0 is the candidates' own item
    # (it would score 1.0 wherever it was read) still never has id 0 chosen: padding and unknown
    # items are ineligible by their id.
    table = make_table(3_000, 32)
    candidates, history, lengths = random_batch(3_000, 2, 4_000, 12, [4_000, 3_100], seed=5, pad_prob=0.3)
    table[0] = table[candidates[0, 0]]
    scores, positions = cosine_topk(table, candidates, history, lengths, 10)
    assert_valid_topk(table, candidates, history, lengths, 10, scores, positions)
    reference = cosine_topk_reference(table, candidates, history, lengths, 10)
    assert torch.equal(positions, reference[1])
    # the fused screen reads row 0 of its copies in place of padding: they hold zeros there
    prep = cpu_topk._table_prep(table)
    assert not prep.screen[0].any() and prep.row_error[0] == 0
    if native.int8_available():
        assert not cpu_topk._int8_copy(table, prep).rows[0].any()
