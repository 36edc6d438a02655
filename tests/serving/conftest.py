"""Fixtures of the serving tests: a controllable stand-in scorer for the HTTP behaviour tests.

The stand-in lets a test hold a ranking inside the scoring thread (to fill the concurrency
bound, or to outlast the deadline) without depending on how fast the real model is; the
Ranker itself is tested on a real data folder and model in test_serving_ranker.py.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from recsys.serving.scorer import Scores, StageTimings


class StubScorer:
    """Scores = a fixed hash of (version, item id); can block each call until released."""

    def __init__(self, version: str = "1", blocking: bool = False):
        self.version = version
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        if not blocking:
            self.release.set()

    def expected(self, candidate_ids) -> np.ndarray:
        ids = np.asarray(candidate_ids, dtype=np.int64).view(np.uint64)
        salt = np.uint64(int(self.version) * 7919)
        with np.errstate(over="ignore"):
            mixed = (ids * np.uint64(2654435761) + salt) % np.uint64(1_000_003)
        return (mixed.astype(np.float64) / 1_000_003).astype(np.float32)

    def score(self, user_id, candidate_ids, ts=None) -> Scores:
        self.entered.release()
        if not self.release.wait(timeout=30):
            raise RuntimeError("stub scorer was never released")
        return Scores(self.expected(candidate_ids), StageTimings(0.1, 0.2, 0.3, 0.6))


@pytest.fixture(scope="session")
def make_stub():
    """StubScorer(version="1", blocking=False)."""
    return StubScorer


# --- a real (tiny) data folder and model ------------------------------------------------------

N_USERS, N_ITEMS, N_CATEGORIES, MM_DIM = 30, 200, 12, 32


def _raw_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Distinct hashed-looking signed int64 ids, as in TAOBAO-MM."""
    return rng.choice(np.iinfo(np.int64).max, size=n, replace=False).astype(np.int64) * rng.choice([-1, 1], size=n)


@pytest.fixture(scope="session")
def data_folder(tmp_path_factory):
    """A complete data folder: items, events (0..150 per user), users with one attribute,
    vocabularies, the SequenceStore and a float16 32-d embedding table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.data.folder import finalize
    from recsys.paths import DataLayout
    from recsys.store.embedding_table import EmbeddingTable

    rng = np.random.default_rng(7)
    layout = DataLayout(tmp_path_factory.mktemp("serving_data"))
    layout.root.mkdir(parents=True, exist_ok=True)
    users, items, cats = _raw_ids(rng, N_USERS), _raw_ids(rng, N_ITEMS), _raw_ids(rng, N_CATEGORIES)
    item_cats = cats[rng.integers(0, N_CATEGORIES, N_ITEMS)]
    pq.write_table(
        pa.table({"item_id": items, "category_id": item_cats, "title": [f"item {i}" for i in range(N_ITEMS)]}),
        layout.items,
    )
    per_user = rng.integers(0, 150, N_USERS)
    per_user[0] = 0  # a known user without any behaviour
    ev_users = np.repeat(users, per_user)
    pq.write_table(
        pa.table({
            "user_id": ev_users,
            "item_id": items[rng.integers(0, N_ITEMS, len(ev_users))],
            "ts": rng.integers(1_000, 100_000, len(ev_users)),
        }),
        layout.events,
    )
    pq.write_table(pa.table({"user_id": users, "age": rng.integers(0, 5, N_USERS)}), layout.users)
    pq.write_table(
        pa.table({
            "user_id": ev_users[:50],
            "item_id": items[:50],
            "ts": np.full(50, 200_000, dtype=np.int64),
            "label": np.zeros(50, dtype=np.int8),
        }),
        layout.impressions,
    )
    finalize(layout)
    vectors = rng.standard_normal((N_ITEMS + 1, MM_DIM)).astype(np.float32)
    EmbeddingTable.from_vectors(vectors, "float16").save(layout.embedding_table("float16"))
    return {"layout": layout, "users": users, "items": items}


def save_fresh_model(layout, directory, seed: int, variant: str = "muse"):
    """A freshly initialised model over `layout`, saved with its feature config to `directory`."""
    import torch

    from recsys.features import FeatureConfig, FeatureMap
    from recsys.models.io import save_model
    from recsys.models.muse import ModelConfig, MuseModel

    torch.manual_seed(seed)
    feature_map = FeatureMap.from_layout(layout)
    config = ModelConfig.from_feature_map(feature_map, variant=variant, embedding_init=0.5)
    model = MuseModel(config)
    # Fresh output layers give near-0.5 scores for everything; widen them so rankings differ.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.is_sparse:
                parameter.mul_(3.0)
    features = FeatureConfig.for_model(config, long_len=120, short_len=20, k=10)
    return save_model(model, directory, features)


@pytest.fixture(scope="session")
def model_dirs(data_folder, tmp_path_factory):
    """Two fresh models over the data folder (different seeds): folders model-a and model-b."""
    root = tmp_path_factory.mktemp("serving_models")
    return [save_fresh_model(data_folder["layout"], root / f"model-{name}", seed) for name, seed in (("a", 1), ("b", 2))]


@pytest.fixture(scope="session")
def sim_soft_model_dir(data_folder, tmp_path_factory):
    """A fresh SIM-soft model (its GSU searches the model's own id table)."""
    return save_fresh_model(data_folder["layout"], tmp_path_factory.mktemp("serving_models") / "sim-soft", 3, "sim-soft")
