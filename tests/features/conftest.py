"""A tiny world for the feature tests: a real SequenceStore, EmbeddingTable and user attributes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.data.vocab import Vocab
from recsys.features import UserFeatures
from recsys.store.embedding_table import EmbeddingTable
from recsys.store.sequence_store import SequenceStore

NUM_USERS, NUM_ITEMS, NUM_CATEGORIES, MM_DIM = 4, 40, 4, 8


@dataclass
class World:
    """Sizes are class attributes so test modules read them from the fixture (a conftest is not importable)."""

    NUM_USERS = NUM_USERS
    NUM_ITEMS = NUM_ITEMS
    NUM_CATEGORIES = NUM_CATEGORIES
    MM_DIM = MM_DIM

    store: SequenceStore
    table: EmbeddingTable
    user_features: UserFeatures
    events: list[tuple[int, int, int]]  # (dense user, dense item, ts), every stored behaviour

    def history_before(self, user: int, ts: int) -> list[int]:
        """Dense items of `user` strictly before `ts`, oldest first (ties by item, as the store sorts)."""
        rows = sorted((t, i) for u, i, t in self.events if u == user and t < ts)
        return [i for _, i in rows]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    rng = np.random.default_rng(0)
    user_keys = np.array([101, 102, 103, 104], dtype=np.int64)
    item_keys = np.arange(1, NUM_ITEMS + 1, dtype=np.int64) * 10
    item_categories = np.concatenate([[0], rng.integers(1, NUM_CATEGORIES + 1, NUM_ITEMS)]).astype(np.int64)
    # User 1: 60 behaviours, user 2: 5, user 3: 0 (cold), user 4: 30; distinct timestamps per user.
    per_user = {1: 60, 2: 5, 3: 0, 4: 30}
    events = []
    for user, n in per_user.items():
        times = rng.choice(np.arange(1_000, 10_000), size=n, replace=False)
        events += [(user, int(rng.integers(1, NUM_ITEMS + 1)), int(t)) for t in times]
    raw = pa.table({
        "user_id": pa.array([user_keys[u - 1] for u, _, _ in events], pa.int64()),
        "item_id": pa.array([item_keys[i - 1] for _, i, _ in events], pa.int64()),
        "ts": pa.array([t for _, _, t in events], pa.int64()),
    })
    store = SequenceStore.build(
        raw,
        tmp_path_factory.mktemp("store") / "store",
        user_vocab=Vocab(user_keys, "user_id"),
        item_vocab=Vocab(item_keys, "item_id"),
        item_categories=item_categories,
    )
    vectors = rng.normal(size=(NUM_ITEMS + 1, MM_DIM)).astype(np.float32)
    vectors[7] = 0.0  # an item without content: zero row, never selected
    table = EmbeddingTable.from_vectors(vectors, "float32")
    attrs = torch.tensor([[0, 0], [1, 2], [2, 1], [3, 3], [1, 1]])
    return World(store, table, UserFeatures(attrs, ["age", "gender"]), events)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread avoids thread hand-off costs on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
