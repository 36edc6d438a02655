"""recsys.gsu.select: the three policies on small hand-checked and random histories."""
from __future__ import annotations

import pytest
import torch

from kernels.reference import cosine_topk_reference
from recsys.gsu import POLICIES, select
from recsys.store.embedding_table import EmbeddingTable
from recsys.store.sequence_store import HistoryBatch


def make_history(item_ids, category_ids, lengths):
    item_ids = torch.tensor(item_ids)
    return HistoryBatch(item_ids, torch.tensor(category_ids), torch.zeros_like(item_ids), torch.tensor(lengths))


def make_table(n_items=40, dim=8, dtype="float32", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return EmbeddingTable.from_vectors(torch.randn(n_items + 1, dim, generator=gen), dtype)


HISTORY = make_history(
    [[3, 4, 5, 6, 7, 8, 0, 0], [9, 10, 11, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]],
    [[1, 2, 1, 1, 2, 1, 0, 0], [2, 2, 3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]],
    [6, 3, 0],
)


def test_sim_hard_takes_the_most_recent_of_the_target_category():
    candidates = torch.tensor([[20, 21], [22, 23], [24, 25]])
    categories = torch.tensor([[1, 2], [2, 0], [1, 1]])
    sel = select("sim-hard", HISTORY, candidates, categories, k=3)
    assert sel.positions[0, 0].tolist() == [5, 3, 2]  # category 1, newest first
    assert sel.positions[0, 1].tolist() == [4, 1, -1]
    assert sel.item_ids[0, 1].tolist() == [7, 4, 0]
    assert sel.category_ids[0, 1].tolist() == [2, 2, 0]
    assert sel.positions[1, 0].tolist() == [1, 0, -1]
    assert (sel.positions[1, 1] == -1).all()  # category 0 (unknown) matches nothing
    assert (sel.positions[2] == -1).all()  # empty history
    assert torch.equal(sel.scores, sel.mask.float())
    assert not sel.mm_similarities.any()  # no table given


def test_sim_hard_matches_a_brute_force_scan():
    gen = torch.Generator().manual_seed(1)
    items = torch.randint(1, 50, (4, 30), generator=gen)
    cats = torch.randint(1, 5, (4, 30), generator=gen)
    lengths = torch.tensor([30, 12, 0, 29])
    history = HistoryBatch(items, cats, torch.zeros_like(items), lengths)
    targets = torch.randint(0, 5, (4, 6), generator=gen)
    sel = select("sim-hard", history, torch.ones(4, 6, dtype=torch.int64), targets, k=5)
    for b in range(4):
        for c in range(6):
            hits = [p for p in range(int(lengths[b])) if targets[b, c] != 0 and cats[b, p] == targets[b, c]]
            expected = hits[::-1][:5] + [-1] * (5 - len(hits[:5]))
            assert sel.positions[b, c].tolist() == expected


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_muse_selects_by_multimodal_cosine(dtype):
    table = make_table(dtype=dtype)
    candidates = torch.tensor([[3, 30], [12, 1], [5, 6]])
    sel = select("muse", HISTORY, candidates, k=4, table=table)
    scores, positions = cosine_topk_reference(table.weights, candidates, HISTORY.item_ids, HISTORY.lengths, 4)
    assert torch.equal(sel.positions, positions)
    assert torch.equal(sel.mask, positions >= 0)
    torch.testing.assert_close(sel.scores, scores.masked_fill(positions < 0, 0), atol=2e-6, rtol=0)
    assert torch.equal(sel.mm_similarities, sel.scores)
    assert sel.positions[0, 0, 0] == 0 and sel.scores[0, 0, 0] == pytest.approx(1.0, abs=1e-5)  # itself
    for c in range(2):  # user 1 has only three behaviours: all are selected, the 4th slot is empty
        assert sorted(sel.item_ids[1, c, :3].tolist()) == [9, 10, 11] and sel.item_ids[1, c, 3] == 0
    torch.testing.assert_close(sel.embeddings(table)[sel.mask], table.lookup(sel.item_ids[sel.mask]))
    assert not sel.embeddings(table)[~sel.mask].any()


def test_sim_soft_uses_the_id_embeddings_and_reports_multimodal_cosine():
    table = make_table()
    id_embeddings = torch.randn(41, 6, generator=torch.Generator().manual_seed(5), requires_grad=True)
    candidates = torch.tensor([[8, 9], [10, 2], [1, 1]])
    sel = select("sim-soft", HISTORY, candidates, k=3, table=table, id_embeddings=id_embeddings)
    _, positions = cosine_topk_reference(id_embeddings.detach(), candidates, HISTORY.item_ids, HISTORY.lengths, 3)
    assert torch.equal(sel.positions, positions)
    assert not sel.scores.requires_grad
    unit = torch.nn.functional.normalize(table.lookup(torch.arange(41)), dim=1)
    expected = (unit[sel.item_ids] * unit[candidates].unsqueeze(2)).sum(-1) * sel.mask
    torch.testing.assert_close(sel.mm_similarities, expected, atol=1e-5, rtol=0)


def test_sim_soft_builds_the_kernels_table_copies_once_for_a_fixed_id_table(monkeypatch):
    # A scorer's id table is the same tensor every call: the kernel's prepared copies are kept for it
    import kernels.cpu_topk as cpu_topk

    built = []
    real_empty_huge = cpu_topk.empty_huge
    monkeypatch.setattr(cpu_topk, "empty_huge", lambda *a, **k: built.append(1) or real_empty_huge(*a, **k))
    id_embeddings = torch.randn(41, 6, generator=torch.Generator().manual_seed(6))
    candidates = torch.tensor([[8, 9], [10, 2], [1, 1]])
    first = select("sim-soft", HISTORY, candidates, k=3, id_embeddings=id_embeddings)
    second = select("sim-soft", HISTORY, candidates, k=3, id_embeddings=id_embeddings)
    assert torch.equal(first.positions, second.positions) and len(built) == 1


@pytest.mark.parametrize(
    ("policy", "kwargs", "message"),
    [
        ("muse", {}, "needs `table`"),
        ("sim-soft", {}, "needs `id_embeddings`"),
        ("sim-hard", {}, "needs `candidate_categories`"),
        ("twin", {}, "unknown policy"),
    ],
)
def test_missing_inputs_are_named(policy, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select(policy, HISTORY, torch.ones(3, 1, dtype=torch.int64), **kwargs)


def test_policies_share_one_output_shape():
    table = make_table()
    candidates = torch.tensor([[1], [2], [3]])
    for policy in POLICIES:
        sel = select(policy, HISTORY, candidates, torch.ones(3, 1, dtype=torch.int64), k=5, table=table,
                     id_embeddings=torch.randn(41, 4))
        for field in (sel.item_ids, sel.category_ids, sel.positions, sel.mask, sel.scores, sel.mm_similarities):
            assert field.shape == (3, 1, 5)
        assert not sel.scores[~sel.mask].any() and (sel.positions[~sel.mask] == -1).all()
