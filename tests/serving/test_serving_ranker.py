"""The Ranker on a real (tiny) data folder with freshly initialised models.

Parity tolerance: scores are float32 probabilities; the same row computed inside batches of
different shapes may differ in the last bits (BLAS blocking), so online and batch scores are
held equal within 1e-5 absolute. The GSU's top-K order is exact here (float16 table, no near ties
at this size), so a larger gap would mean different features, not rounding.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from recsys.cli import UserError
from recsys.features import FeatureBuilder
from recsys.models.io import load_feature_config, load_model_dir
from recsys.serving.app import ServeSettings, create_app
from recsys.serving.ranker import Ranker
from recsys.serving.reload import AliasPoller, ModelHolder

ATOL = 1e-5


@pytest.fixture(scope="module")
def ranker(data_folder, model_dirs):
    return Ranker.load(str(model_dirs[0]), data_folder["layout"].root)


def test_online_scores_equal_batch_scores(ranker, data_folder):
    rng = np.random.default_rng(0)
    users = data_folder["users"][:6]
    candidates = np.stack([rng.choice(data_folder["items"], 15, replace=False) for _ in users])
    ts = rng.integers(1_000, 120_000, len(users))
    online = np.stack([ranker.score(int(u), c.tolist(), int(t)).probabilities for u, c, t in zip(users, candidates, ts)])
    batch = ranker.score_batch(users, candidates, ts).probabilities
    np.testing.assert_allclose(online, batch, atol=ATOL, rtol=0)
    # Splitting the batch into chunks (as batch scoring of large inputs does) changes nothing either.
    for limits in ({"max_rows": 40}, {"max_history_cells": 200}):
        chunked = Ranker(ranker.model, ranker.features, ranker.user_vocab, ranker.item_vocab, "x", **limits)
        np.testing.assert_allclose(chunked.score_batch(users, candidates, ts).probabilities, batch, atol=ATOL, rtol=0)
    # Nor does scoring each candidate alone, as impression-level batch scoring does (C = 1).
    single = ranker.score_batch(np.repeat(users, 15), candidates.reshape(-1, 1), np.repeat(ts, 15)).probabilities
    np.testing.assert_allclose(single.reshape(batch.shape), batch, atol=ATOL, rtol=0)


def test_scores_equal_the_training_feature_path(ranker, data_folder, model_dirs):
    """Independent of the Ranker: dense ids -> FeatureBuilder -> model -> sigmoid, as training does."""
    layout = data_folder["layout"]
    model = load_model_dir(model_dirs[0])
    builder = FeatureBuilder.from_layout(layout, load_feature_config(model_dirs[0]), table_dtype="float16")
    users, items = data_folder["users"][3:6], data_folder["items"][10:30]
    dense_users = torch.from_numpy(ranker.user_vocab.encode(users))
    dense_items = torch.from_numpy(ranker.item_vocab.encode(np.tile(items, (3, 1))))
    ts = torch.tensor([50_000, 80_000, 100_000])
    with torch.no_grad():
        expected = torch.sigmoid(model(builder.build(dense_users, dense_items, ts))).reshape(3, -1).numpy()
    got = ranker.score_batch(users, np.tile(items, (3, 1)), ts.numpy()).probabilities
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_unknown_users_and_items_are_scored_not_rejected(ranker, data_folder):
    known_item = int(data_folder["items"][0])
    unknown_item = 987654321987
    assert unknown_item not in set(data_folder["items"].tolist())
    for user in (123456789, int(data_folder["users"][0]), int(data_folder["users"][5])):
        probabilities = ranker.score(user, [known_item, unknown_item]).probabilities
        assert probabilities.shape == (2,) and np.isfinite(probabilities).all()
        assert ((probabilities > 0) & (probabilities < 1)).all()


def test_ts_cuts_the_history_point_in_time(ranker, data_folder):
    store = ranker.features.store
    user = int(data_folder["users"][int(np.argmax([store.lengths(ranker.user_vocab.encode([u]))[0] for u in data_folder["users"]]))])
    dense = ranker.user_vocab.encode([user])[0]
    last_ts = int(store.user_rows(int(dense))["ts"].max())
    items = data_folder["items"][:8].tolist()
    after_all = ranker.score(user, items).probabilities
    np.testing.assert_allclose(ranker.score(user, items, ts=last_ts + 1).probabilities, after_all, atol=ATOL, rtol=0)
    # Before the last behaviour the history is shorter, so the features and scores change.
    assert np.abs(ranker.score(user, items, ts=last_ts).probabilities - after_all).max() > 1e-4
    # Any time before the first behaviour gives the same (empty) history.
    first_ts = int(store.user_rows(int(dense))["ts"].min())
    empty = ranker.score(user, items, ts=0).probabilities
    np.testing.assert_allclose(ranker.score(user, items, ts=first_ts).probabilities, empty, atol=ATOL, rtol=0)
    assert np.abs(empty - after_all).max() > 1e-4


def test_stage_timings_add_up(ranker, data_folder):
    t = ranker.score(int(data_folder["users"][4]), data_folder["items"][:50].tolist()).timings
    assert min(t.history_ms, t.gsu_ms, t.esu_ms) >= 0
    assert t.history_ms + t.gsu_ms + t.esu_ms <= t.total_ms + 1e-6


def test_loading_prepares_the_gsu_table_before_the_first_request(data_folder, model_dirs, sim_soft_model_dir, monkeypatch):
    import recsys.serving.ranker as ranker_module

    prepared = []
    monkeypatch.setattr(ranker_module, "prepare_table", prepared.append)
    loaded = Ranker.load(str(model_dirs[0]), data_folder["layout"].root)
    assert loaded.feature_config.gsu_policy == "muse"
    assert len(prepared) == 1 and prepared[0] is loaded.features.table.weights
    # SIM-soft searches the model's own id table: that one is prepared, and requests reuse it
    soft = Ranker.load(str(sim_soft_model_dir), data_folder["layout"].root)
    assert soft.feature_config.gsu_policy == "sim-soft" and prepared[-1] is soft._id_embeddings


def test_load_rejects_a_folder_that_is_not_a_model(data_folder, tmp_path):
    with pytest.raises(UserError, match="not a saved model folder"):
        Ranker.load(str(tmp_path), data_folder["layout"].root)
    with pytest.raises(UserError, match="data folder not found"):
        Ranker.load(str(tmp_path), tmp_path / "missing")


def test_http_answers_equal_in_process_scores(ranker, data_folder):
    user, items = int(data_folder["users"][7]), data_folder["items"][:40].tolist()
    expected = ranker.score(user, items, ts=90_000).probabilities
    with TestClient(create_app(ModelHolder(ranker), ServeSettings())) as client:
        body = client.post("/rank", json={"user_id": user, "candidates": items, "ts": 90_000}).json()
    got = {item["item_id"]: item["score"] for item in body["items"]}
    np.testing.assert_allclose([got[i] for i in items], expected, atol=ATOL, rtol=0)
    assert body["model_version"] == "model-a"


def test_hot_reload_between_real_models_under_load(data_folder, model_dirs):
    """Four clients rank while the served model moves from model-a to model-b: zero failures, and
    every answer is exactly the ranking of the version it names."""
    root = data_folder["layout"].root
    rankers = {d.name: Ranker.load(str(d), root) for d in model_dirs}
    user, items = int(data_folder["users"][9]), data_folder["items"][50:150].tolist()
    expected = {v: r.score(user, items).probabilities for v, r in rankers.items()}
    assert np.abs(expected["model-a"] - expected["model-b"]).max() > 1e-3
    target = {"dir": model_dirs[0]}
    holder = ModelHolder(rankers["model-a"])
    poller = AliasPoller(holder, probe=lambda: target["dir"].name,
                         load=lambda: Ranker.load(str(target["dir"]), root), interval_s=0.05)
    stop = threading.Event()

    def client_loop(client):
        answers = []
        while not stop.is_set() or len(answers) < 3:
            response = client.post("/rank", json={"user_id": user, "candidates": items})
            answers.append((response.status_code, response.json()))
        return answers

    with TestClient(create_app(holder, ServeSettings(), poller=poller)) as client, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop, client) for _ in range(4)]
        target["dir"] = model_dirs[1]
        for _ in range(300):
            if holder.current.version == "model-b":
                break
            threading.Event().wait(0.02)
        threading.Event().wait(0.3)
        stop.set()
        answers = [a for f in futures for a in f.result(timeout=60)]
    assert holder.current.version == "model-b"
    assert all(status == 200 for status, _ in answers), [b for s, b in answers if s != 200][:3]
    seen = {body["model_version"] for _, body in answers}
    assert seen == {"model-a", "model-b"}
    for _, body in answers:
        got = {item["item_id"]: item["score"] for item in body["items"]}
        np.testing.assert_allclose([got[i] for i in items], expected[body["model_version"]], atol=ATOL, rtol=0)
