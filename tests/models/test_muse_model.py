"""MuseModel: every variant trains, padding and batch company never change a row's logit, configs fail clearly."""
from __future__ import annotations

import json

import pytest
import torch

from recsys.features import FeatureMap
from recsys.models import VARIANTS, ModelConfig, MuseModel, variant_spec


def _scramble_padding(batch, seed=1):
    """Same batch with random ids and similarities in every padding slot."""
    g = torch.Generator().manual_seed(seed)
    out = batch.select(torch.arange(batch.num_rows))
    for ids, mask in (("short_items", "short_mask"), ("short_categories", "short_mask"),
                      ("long_items", "long_mask"), ("long_categories", "long_mask")):
        m = getattr(out, mask)
        setattr(out, ids, torch.where(m, getattr(out, ids), torch.randint(1, 5, m.shape, generator=g)))
    for sims, mask in (("short_mm_sims", "short_mask"), ("long_mm_sims", "long_mask"), ("long_sims", "long_mask")):
        m = getattr(out, mask)
        setattr(out, sims, torch.where(m, getattr(out, sims), torch.rand(m.shape, generator=g) * 2 - 1))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_forward_backward_touches_exactly_its_blocks(variant, make_batch, make_config):
    torch.manual_seed(0)
    model = MuseModel(make_config(variant))
    batch = make_batch(12)
    logits = model(batch)
    assert logits.shape == (12,) and logits.dtype == torch.float32
    model.loss(logits, batch.labels).backward()
    spec = variant_spec(variant)
    # Blocks a variant does not use are not built, so every parameter must receive a gradient.
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{variant}: no gradient for {name}"
        grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        assert torch.isfinite(grad).all(), name
    assert all(p.grad.is_sparse for p in model.sparse_parameters())
    assert (model.long_attention is not None) == (spec.gsu_policy is not None)
    if model.long_attention is not None:
        assert model.long_attention.fuse == (spec.long_attention == "sa-ta")
    assert (model.long_simtier is not None) == spec.simtier
    names = {n for n, _ in model.named_parameters()}
    assert any("gates" in n for n in names) == (spec.long_attention == "sa-ta")
    assert any("simtier" in n for n in names) == spec.simtier


@pytest.mark.parametrize("variant", ["din", "muse", "sim-hard"])
def test_padding_content_and_batch_company_change_nothing(variant, make_batch, make_config):
    torch.manual_seed(0)
    model = MuseModel(make_config(variant)).eval()
    batch = make_batch(10)
    with torch.no_grad():
        logits = model(batch)
        assert torch.equal(logits, model(_scramble_padding(batch)))
        alone = torch.cat([model(batch.select(torch.tensor([r]))) for r in range(batch.num_rows)])
    assert torch.allclose(logits, alone, atol=1e-6)


def test_rows_without_any_history_are_finite(make_batch, make_config):
    model = MuseModel(make_config("muse"))
    empty = torch.zeros(6, dtype=torch.long)
    batch = make_batch(6, short_lengths=empty, long_lengths=empty)
    logits = model(batch)
    assert torch.isfinite(logits).all()
    model.loss(logits, batch.labels).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.dense_parameters())


def test_unknown_and_out_of_vocab_ids_read_as_unknown(make_batch, make_config):
    model = MuseModel(make_config("muse")).eval()
    batch = make_batch(4)
    beyond = batch.select(torch.arange(4))
    beyond.target_items = torch.full((4,), 10_000)
    zero = batch.select(torch.arange(4))
    zero.target_items = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(beyond), model(zero))


def test_parameter_groups_partition_the_model(make_config):
    model = MuseModel(make_config("muse", use_user_id=True))
    sparse, dense = model.sparse_parameters(), model.dense_parameters()
    assert len(sparse) == 2 + 1 + 2  # item, category, user id, two attributes
    assert {id(p) for p in sparse}.isdisjoint({id(p) for p in dense})
    assert len(sparse) + len(dense) == len(list(model.parameters()))
    table = model.item_id_embeddings()
    assert table.shape == (model.config.item_vocab_size, model.config.id_dim) and not table.requires_grad


def test_optimizers_step_on_their_groups(make_batch, make_config):
    torch.manual_seed(0)
    model = MuseModel(make_config("muse"))
    dense = torch.optim.AdamW(model.dense_parameters(), lr=1e-2)
    sparse = torch.optim.SparseAdam(model.sparse_parameters(), lr=1e-2)
    batch = make_batch(16)
    first = model.loss(model(batch), batch.labels).item()
    for _ in range(20):
        dense.zero_grad()
        sparse.zero_grad()
        model.loss(model(batch), batch.labels).backward()
        dense.step()
        sparse.step()
    assert model.loss(model(batch), batch.labels).item() < first


def test_widths_come_from_config(make_batch, make_config):
    cfg = make_config("muse", id_dim=5, attention_dim=7, simtier_tiers=10, tower_hidden=(9, 4), user_dim=2)
    model = MuseModel(cfg)
    # target, short attention, short mean, long mean: 2*id_dim each; SA-TA; 2 SimTiers; mm; 3 user tables.
    assert model.tower_in_dim == 4 * 10 + 7 + 2 * 10 + 8 + 3 * 2
    assert model.tower.out_dim == 4
    assert model(make_batch(3)).shape == (3,)


def test_unknown_variant_lists_valid_names(make_config):
    with pytest.raises(ValueError) as err:
        make_config("twin")
    for name in VARIANTS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(id_dim=0), "id_dim"),
        (dict(item_vocab_size=0), "item_vocab_size"),
        (dict(user_attr_vocab_sizes={"age": 0}), "age"),
        (dict(user_attr_vocab_sizes={"id": 3}), "user_attr_vocab_sizes"),
        (dict(user_attr_vocab_sizes={"a.b": 3}), "user_attr_vocab_sizes"),
        (dict(tower_hidden=(8, 0)), "tower_hidden"),
        (dict(dropout=1.0), "dropout"),
        (dict(sata_temperature=0.0), "sata_temperature"),
        (dict(mm_dim=0), "mm_dim"),
        (dict(tower_activation="swish"), "tower_activation"),
    ],
)
def test_config_errors_name_the_field(overrides, field, make_config):
    with pytest.raises(ValueError, match=field):
        make_config("muse", **overrides)


def test_din_needs_no_multimodal_width(make_config):
    assert make_config("din", mm_dim=0).mm_dim == 0


def test_validate_against_feature_map(make_config):
    cfg = make_config("muse")
    fits = FeatureMap(cfg.item_vocab_size, cfg.category_vocab_size, cfg.user_vocab_size,
                      dict(cfg.user_attr_vocab_sizes), mm_dim=cfg.mm_dim)
    cfg.validate_against(fits)
    grown = FeatureMap(cfg.item_vocab_size + 5, cfg.category_vocab_size, cfg.user_vocab_size,
                       dict(cfg.user_attr_vocab_sizes), mm_dim=cfg.mm_dim)
    with pytest.raises(ValueError, match="item_vocab_size .* does not cover"):
        cfg.validate_against(grown)
    other_attrs = FeatureMap(cfg.item_vocab_size, cfg.category_vocab_size, cfg.user_vocab_size, {"age": 4})
    with pytest.raises(ValueError, match="user_attr_vocab_sizes"):
        cfg.validate_against(other_attrs)
    wrong_mm = FeatureMap(cfg.item_vocab_size, cfg.category_vocab_size, cfg.user_vocab_size,
                          dict(cfg.user_attr_vocab_sizes), mm_dim=cfg.mm_dim * 2)
    with pytest.raises(ValueError, match="mm_dim"):
        cfg.validate_against(wrong_mm)
    assert ModelConfig.from_feature_map(grown, variant="din").item_vocab_size == cfg.item_vocab_size + 5


def test_config_json_round_trip(make_config):
    cfg = make_config("muse-plain-ta", tower_hidden=(32, 16))
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "heads": 4})


def test_long_branch_variant_rejects_batches_without_selection(make_batch, make_config):
    model = MuseModel(make_config("sim-hard"))
    batch = make_batch(3)
    for name in ("long_items", "long_categories", "long_mask", "long_sims", "long_mm_sims"):
        setattr(batch, name, getattr(batch, name)[:, :0])
    with pytest.raises(ValueError, match="FeatureConfig.for_model"):
        model(batch)
    assert MuseModel(make_config("din"))(batch).shape == (3,)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_feature_config_takes_the_gsu_policy_of_the_variant(variant, make_config):
    from recsys.features import FeatureConfig

    config = make_config(variant)
    features = FeatureConfig.for_model(config, long_len=100, short_len=10, k=7)
    assert features.gsu_policy == variant_spec(variant).gsu_policy
    assert features.user_attributes == tuple(config.user_attr_vocab_sizes)
    assert (features.long_len, features.short_len, features.k) == (100, 10, 7)
