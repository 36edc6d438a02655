"""FeatureBuilder: shapes, flattening, point-in-time cuts, and candidates built together == built alone."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from recsys.features import CTRBatch, FeatureBuilder, FeatureConfig
from recsys.models import MuseModel
from recsys.models.muse import ModelConfig

S, K, LONG = 6, 5, 40
# The world fixture's sizes (tests/features/conftest.py).
NUM_USERS, NUM_ITEMS, NUM_CATEGORIES, MM_DIM = 4, 40, 4, 8
USERS = torch.tensor([1, 2, 3, 4, 1])
TS = torch.tensor([9_000, 9_000, 5_000, 4_000, 2_500])


def _builder(world, policy="muse", k=K, table=True, users=True, dtype="float32") -> FeatureBuilder:
    config = FeatureConfig(long_len=LONG, short_len=S, k=k, gsu_policy=policy,
                           user_attributes=("age", "gender") if users else ())
    mm = (world.table if dtype == "float32" else world.table.to_dtype(dtype)) if table else None
    return FeatureBuilder(world.store, mm, world.user_features if users else None, config)


def _candidates(b: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, NUM_ITEMS + 1, (b, c), generator=g)


def test_world_sizes_match(world):
    assert (world.NUM_USERS, world.NUM_ITEMS, world.NUM_CATEGORIES, world.MM_DIM) == (
        NUM_USERS, NUM_ITEMS, NUM_CATEGORIES, MM_DIM)


def test_shapes_and_flattening(world):
    b, c = len(USERS), 3
    candidates = _candidates(b, c)
    labels = torch.randint(0, 2, (b, c))
    batch = _builder(world).build(USERS, candidates, TS, labels)
    rows = b * c
    assert batch.num_rows == rows
    for name, shape in {
        "user_ids": (rows,), "user_features": (rows, 2), "target_items": (rows,), "target_categories": (rows,),
        "target_mm": (rows, MM_DIM), "short_items": (rows, S), "short_mask": (rows, S), "short_mm_sims": (rows, S),
        "long_items": (rows, K), "long_categories": (rows, K), "long_mask": (rows, K), "long_sims": (rows, K),
        "long_mm_sims": (rows, K), "history_lengths": (rows,), "request_index": (rows,), "labels": (rows,),
    }.items():
        assert tuple(getattr(batch, name).shape) == shape, name
    assert batch.short_mask.dtype == torch.bool and batch.long_sims.dtype == torch.float32
    assert repr(batch) == f"CTRBatch(rows={rows}, short={S}, long={K}, mm_dim={MM_DIM}, user_features=2, labels=yes, device=cpu)"
    # Row b * C + c is user b, candidate c.
    assert torch.equal(batch.request_index, torch.arange(b).repeat_interleave(c))
    assert torch.equal(batch.user_ids, USERS.repeat_interleave(c))
    assert torch.equal(batch.target_items, candidates.reshape(-1))
    assert torch.equal(batch.labels, labels.reshape(-1).float())
    assert torch.equal(batch.target_categories, world.store.item_categories[candidates.reshape(-1)])
    assert torch.equal(batch.user_features, world.user_features.table[USERS].repeat_interleave(c, dim=0))
    assert torch.allclose(batch.target_mm, world.table.lookup(candidates.reshape(-1)))


def test_point_in_time_no_behaviour_at_or_after_ts(world):
    # Cut exactly at an event's timestamp: that event must not be seen.
    user = 1
    event_ts = sorted(t for u, _, t in world.events if u == user)[30]
    users, ts = torch.tensor([user, 4, 3]), torch.tensor([event_ts, 9_999, 5_000])
    batch = _builder(world).build(users, _candidates(3, 2), ts)
    for r in range(batch.num_rows):
        u, t = int(batch.user_ids[r]), int(ts[batch.request_index[r]])
        before = world.history_before(u, t)
        short = batch.short_items[r][batch.short_mask[r]].tolist()
        assert short == before[-S:]
        assert int(batch.history_lengths[r]) == len(before)
        long = batch.long_items[r][batch.long_mask[r]].tolist()
        assert set(long) <= set(before[-LONG:])
        assert len(long) == min(K, sum(1 for i in before[-LONG:] if i != 7))  # item 7 has no embedding
    assert batch.history_lengths[0] == 30
    assert not batch.short_mask[4:].any() and not batch.long_mask[4:].any()  # cold user 3


def test_multimodal_similarities_are_cosines_to_the_target(world):
    batch = _builder(world).build(USERS, _candidates(len(USERS), 4), TS)
    unit = torch.nn.functional.normalize(world.table.as_float(), dim=1)
    target = unit[batch.target_items]
    expected_long = torch.einsum("rkd,rd->rk", unit[batch.long_items], target) * batch.long_mask
    expected_short = torch.einsum("rsd,rd->rs", unit[batch.short_items], target) * batch.short_mask
    assert torch.allclose(batch.long_mm_sims, expected_long, atol=1e-5)
    assert torch.allclose(batch.short_mm_sims, expected_short, atol=1e-5)
    assert torch.equal(batch.long_sims, batch.long_mm_sims)  # the muse GSU score is the mm cosine
    real = batch.long_sims.masked_fill(~batch.long_mask, float("-inf"))
    assert (real[:, :-1] >= real[:, 1:]).all()  # best first


@pytest.mark.parametrize(
    "policy, dtype",
    [("muse", "float32"), ("muse", "float16"), ("muse", "int8"), ("sim-hard", "float32"),
     ("sim-soft", "float32"), (None, "float32")],
)
def test_candidates_built_together_equal_each_built_alone(world, policy, dtype):
    """The online/offline parity base: a row depends on (user, candidate, ts) only."""
    builder = _builder(world, policy=policy, k=K if policy else 0, dtype=dtype)
    id_embeddings = torch.randn(NUM_ITEMS + 1, 4, generator=torch.Generator().manual_seed(3))
    candidates = _candidates(len(USERS), 6, seed=1)
    together = builder.build(USERS, candidates, TS, id_embeddings=id_embeddings)
    for b in range(len(USERS)):
        for c in range(candidates.shape[1]):
            alone = builder.build(USERS[b : b + 1], candidates[b : b + 1, c : c + 1], TS[b : b + 1],
                                  id_embeddings=id_embeddings)
            r = b * candidates.shape[1] + c
            for f in dataclasses.fields(CTRBatch):
                if f.name in ("request_index", "labels"):
                    continue
                assert torch.equal(getattr(together, f.name)[r], getattr(alone, f.name)[0]), (policy, b, c, f.name)


def test_din_policy_needs_no_table_and_has_no_long_columns(world):
    batch = _builder(world, policy=None, k=0, table=False, users=False).build(USERS, _candidates(len(USERS), 2), TS)
    assert batch.long_items.shape == (10, 0) and batch.long_mask.shape == (10, 0)
    assert batch.target_mm.shape == (10, 0) and batch.user_features.shape == (10, 0)
    assert torch.equal(batch.short_mm_sims, torch.zeros(10, S))
    assert batch.short_mask.any()


def test_builder_errors_are_clear(world):
    with pytest.raises(ValueError, match="needs a multimodal EmbeddingTable"):
        _builder(world, table=False)
    builder = _builder(world, policy="sim-soft")
    with pytest.raises(ValueError, match="id_embeddings"):
        builder.build(USERS, _candidates(len(USERS), 2), TS)
    builder = _builder(world)
    with pytest.raises(ValueError, match="candidates must be"):
        builder.build(USERS, _candidates(3, 2), TS)
    with pytest.raises(ValueError, match="ts must be"):
        builder.build(USERS, _candidates(len(USERS), 2), TS[:2])
    with pytest.raises(ValueError, match="labels must be"):
        builder.build(USERS, _candidates(len(USERS), 2), TS, labels=torch.zeros(len(USERS)))
    with pytest.raises(ValueError, match="integers"):
        builder.build(USERS.float(), _candidates(len(USERS), 2), TS)
    with pytest.raises(ValueError, match="user_attributes"):
        FeatureBuilder(world.store, world.table, world.user_features, FeatureConfig(user_attributes=("age",)))
    with pytest.raises(ValueError, match="gsu_policy"):
        FeatureConfig(gsu_policy="twin")
    with pytest.raises(ValueError, match="short_len"):
        FeatureConfig(long_len=10, short_len=50)


def test_unknown_candidates_and_users_are_zero_rows(world):
    users = torch.tensor([0, NUM_USERS + 5])
    candidates = torch.tensor([[0, NUM_ITEMS + 3], [2, 0]])
    batch = _builder(world).build(users, candidates, torch.tensor([9_000, 9_000]))
    assert torch.equal(batch.target_categories, torch.tensor([0, 0, int(world.store.item_categories[2]), 0]))
    assert not batch.short_mask.any() and not batch.long_mask.any()
    assert torch.equal(batch.user_features, torch.zeros(4, 2, dtype=torch.long))
    assert torch.equal(batch.target_mm[0], torch.zeros(MM_DIM))


def test_concat_keeps_requests_apart_and_moves_devices(world):
    builder = _builder(world)
    first = builder.build(USERS[:2], _candidates(2, 3), TS[:2], labels=torch.ones(2, 3))
    second = builder.build(USERS[2:], _candidates(3, 3), TS[2:], labels=torch.zeros(3, 3))
    both = CTRBatch.concat([first, second])
    assert both.num_rows == 15
    assert torch.equal(both.request_index, torch.arange(5).repeat_interleave(3))
    assert torch.equal(both.labels, torch.cat([torch.ones(6), torch.zeros(9)]))
    assert torch.equal(both.long_items, torch.cat([first.long_items, second.long_items]))
    assert CTRBatch.concat([first, builder.build(USERS[:1], _candidates(1, 1), TS[:1])]).labels is None
    other_width = _builder(world, k=K + 1).build(USERS[:1], _candidates(1, 1), TS[:1])
    with pytest.raises(ValueError, match="'long_items' has different widths"):
        CTRBatch.concat([first, other_width])
    moved = both.to("cpu")
    assert moved.num_rows == both.num_rows and moved.target_mm.device.type == "cpu"


@pytest.mark.parametrize("variant", ["muse", "din", "sim-hard"])
def test_model_scores_equal_online_and_offline(world, variant):
    """Builder + model end to end: scoring a request at once equals scoring each candidate alone."""
    config = ModelConfig(
        item_vocab_size=NUM_ITEMS + 1, category_vocab_size=NUM_CATEGORIES + 1, user_vocab_size=NUM_USERS + 1,
        user_attr_vocab_sizes={"age": 4, "gender": 4}, variant=variant, id_dim=4, user_dim=2, mm_dim=MM_DIM,
        attention_dim=4, din_hidden=(8,), tower_hidden=(16, 8),
    )
    torch.manual_seed(0)
    model = MuseModel(config).eval()
    features = FeatureConfig.for_model(config, long_len=LONG, short_len=S, k=K)
    builder = FeatureBuilder(world.store, world.table, world.user_features, features)
    candidates = _candidates(len(USERS), 4, seed=2)
    with torch.no_grad():
        together = model(builder.build(USERS, candidates, TS))
        alone = torch.stack([
            model(builder.build(USERS[b : b + 1], candidates[b : b + 1, c : c + 1], TS[b : b + 1]))[0]
            for b in range(len(USERS)) for c in range(4)
        ])
    assert torch.allclose(together, alone, atol=1e-6)


def test_sim_soft_ranks_by_the_given_id_embeddings(world):
    builder = _builder(world, policy="sim-soft")
    candidates = _candidates(len(USERS), 2, seed=4)
    g = torch.Generator().manual_seed(5)
    first = builder.build(USERS, candidates, TS, id_embeddings=torch.randn(NUM_ITEMS + 1, 4, generator=g))
    second = builder.build(USERS, candidates, TS, id_embeddings=torch.randn(NUM_ITEMS + 1, 4, generator=g))
    assert not torch.equal(first.long_items, second.long_items)
    assert torch.equal(first.long_mask, second.long_mask)  # same eligible behaviours, other order
    # The mm similarities still describe the selected behaviours.
    unit = torch.nn.functional.normalize(world.table.as_float(), dim=1)
    expected = torch.einsum("rkd,rd->rk", unit[second.long_items], unit[second.target_items]) * second.long_mask
    assert torch.allclose(second.long_mm_sims, expected, atol=1e-5)


def test_batches_flow_through_a_dataloader(world):
    builder = _builder(world)
    parts = [builder.build(USERS[i : i + 1], _candidates(1, 2, seed=i), TS[i : i + 1], labels=torch.ones(1, 2))
             for i in range(len(USERS))]
    loader = torch.utils.data.DataLoader(parts, batch_size=2, collate_fn=CTRBatch.concat)
    merged = list(loader)
    assert [b.num_rows for b in merged] == [4, 4, 2]
    assert torch.equal(merged[0].request_index, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(merged[1].long_items, torch.cat([parts[2].long_items, parts[3].long_items]))
