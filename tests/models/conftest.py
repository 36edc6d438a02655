"""Factories of random CTRBatches and small ModelConfigs (fixtures: test modules cannot import a conftest)."""
from __future__ import annotations

import pytest
import torch

from recsys.features import CTRBatch
from recsys.models import ModelConfig

ITEMS, CATEGORIES, USERS = 30, 5, 8
ATTRS = {"age": 4, "gender": 3}
S, K, MM = 6, 5, 8


def random_batch(rows: int, seed: int = 0, short_lengths=None, long_lengths=None) -> CTRBatch:
    """A batch with left-aligned padding; padding ids are 0 and padding sims 0, as the builder makes them."""
    g = torch.Generator().manual_seed(seed)
    short_lengths = torch.randint(0, S + 1, (rows,), generator=g) if short_lengths is None else short_lengths
    long_lengths = torch.randint(0, K + 1, (rows,), generator=g) if long_lengths is None else long_lengths
    short_mask = torch.arange(S)[None, :] < short_lengths[:, None]
    long_mask = torch.arange(K)[None, :] < long_lengths[:, None]

    def ids(high, shape, mask=None):
        x = torch.randint(1, high, shape, generator=g)
        return x if mask is None else x * mask

    def sims(mask):
        return (torch.rand(mask.shape, generator=g) * 2 - 1) * mask

    return CTRBatch(
        user_ids=ids(USERS, (rows,)),
        user_features=torch.stack([ids(n, (rows,)) for n in ATTRS.values()], dim=1),
        target_items=ids(ITEMS, (rows,)),
        target_categories=ids(CATEGORIES, (rows,)),
        target_mm=torch.nn.functional.normalize(torch.randn(rows, MM, generator=g), dim=1),
        short_items=ids(ITEMS, (rows, S), short_mask),
        short_categories=ids(CATEGORIES, (rows, S), short_mask),
        short_mask=short_mask,
        short_mm_sims=sims(short_mask),
        long_items=ids(ITEMS, (rows, K), long_mask),
        long_categories=ids(CATEGORIES, (rows, K), long_mask),
        long_mask=long_mask,
        long_sims=sims(long_mask),
        long_mm_sims=sims(long_mask),
        history_lengths=long_lengths * 3,
        request_index=torch.arange(rows) // 2,
        labels=(torch.rand(rows, generator=g) > 0.5).float(),
    )


def small_config(variant: str = "muse", **overrides) -> ModelConfig:
    base = dict(
        item_vocab_size=ITEMS,
        category_vocab_size=CATEGORIES,
        user_vocab_size=USERS,
        user_attr_vocab_sizes=dict(ATTRS),
        variant=variant,
        id_dim=4,
        user_dim=3,
        mm_dim=MM,
        attention_dim=6,
        din_hidden=(8,),
        tower_hidden=(16, 8),
        simtier_tiers=20,
    )
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def make_batch():
    return random_batch


@pytest.fixture
def make_config():
    return small_config


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread avoids thread hand-off costs on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
