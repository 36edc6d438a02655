"""A tiny, learnable data folder for the training tests.

Every user prefers one category: most behaviours come from it, and an impression is clicked with
probability 0.85 when the target is in that category and 0.1 otherwise. Item embeddings cluster
by category, so both the ID and the multimodal signal predict clicks and the loss must fall.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys.data.folder import finalize
from recsys.data.vocab import Vocab
from recsys.paths import DataLayout
from recsys.schema import write_contract
from recsys.store.embedding_table import EmbeddingTable

USERS, ITEMS, CATEGORIES, DIM = 40, 80, 4, 16
EVENTS_PER_USER, IMPRESSIONS_PER_USER = 60, 40


def build_tiny_folder(root: Path, seed: int = 0) -> DataLayout:
    rng = np.random.default_rng(seed)
    layout = DataLayout(root)
    item_ids = 1000 + np.arange(ITEMS, dtype=np.int64) * 7  # raw ids differ from dense ones
    item_cat = np.arange(ITEMS) % CATEGORIES
    user_ids = 50 + np.arange(USERS, dtype=np.int64) * 3
    favourite = rng.integers(0, CATEGORIES, USERS)

    def pick(u: int, n: int) -> np.ndarray:
        same = rng.random(n) < 0.7
        cats = np.where(same, favourite[u], rng.integers(0, CATEGORIES, n))
        return np.array([rng.choice(np.flatnonzero(item_cat == c)) for c in cats])

    ev_u, ev_i, ev_t, im_u, im_i, im_t, im_y = [], [], [], [], [], [], []
    for u in range(USERS):
        items = pick(u, EVENTS_PER_USER)
        ev_u += [user_ids[u]] * EVENTS_PER_USER
        ev_i += item_ids[items].tolist()
        ev_t += (np.arange(EVENTS_PER_USER) * 100 + u).tolist()
        targets = rng.integers(0, ITEMS, IMPRESSIONS_PER_USER)
        p = np.where(item_cat[targets] == favourite[u], 0.85, 0.1)
        im_u += [user_ids[u]] * IMPRESSIONS_PER_USER
        im_i += item_ids[targets].tolist()
        im_t += (1000 + np.arange(IMPRESSIONS_PER_USER) * 150 + u).tolist()
        im_y += (rng.random(IMPRESSIONS_PER_USER) < p).astype(np.int8).tolist()

    write_contract(pa.table({"item_id": item_ids, "category_id": 500 + item_cat.astype(np.int64),
                             "title": [f"item {i}" for i in range(ITEMS)]}), layout.items, "items")
    write_contract(pa.table({"user_id": user_ids, "age": rng.integers(0, 3, USERS).astype(np.int64)}), layout.users, "users")
    write_contract(pa.table({"user_id": np.array(ev_u, np.int64), "item_id": np.array(ev_i, np.int64),
                             "ts": np.array(ev_t, np.int64)}), layout.events, "events")
    write_contract(pa.table({"user_id": np.array(im_u, np.int64), "item_id": np.array(im_i, np.int64),
                             "ts": np.array(im_t, np.int64), "label": np.array(im_y, np.int8)}),
                   layout.impressions, "impressions")
    finalize(layout)

    item_vocab = Vocab.load(layout.vocab("item_id"))
    centroids = rng.normal(size=(CATEGORIES, DIM))
    vectors = np.zeros((item_vocab.size, DIM), dtype=np.float32)
    dense = item_vocab.encode(item_ids)
    vectors[dense] = centroids[item_cat] + 0.3 * rng.normal(size=(ITEMS, DIM))
    EmbeddingTable.from_vectors(vectors, "float16").save(layout.embedding_table("float16"))
    return layout


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> DataLayout:
    return build_tiny_folder(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture
def tiny_data(tiny_source, tmp_path) -> DataLayout:
    """A private copy of the tiny folder (tests write splits, runs and models into it)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_source.root, root)
    return DataLayout(root)
