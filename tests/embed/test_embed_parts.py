"""The parts of the embedding stage on their own (no Ray): pairs, loss, alignment, image
preprocessing, caches, config and the index."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from recsys.data.vocab import Vocab
from recsys.embed.align import AlignmentModel, drop_modalities, project, split_modalities, train_alignment
from recsys.embed.behaviour import behaviour_pairs, user_sequences
from recsys.embed.cache import FeatureCache
from recsys.embed.config import AlignConfig, ConfigError, EmbedConfig, ImageConfig, IndexConfig
from recsys.embed.content import item_text, text_inputs
from recsys.embed.contrastive import MemoryQueue, info_nce
from recsys.embed.image import ImageEncoder, load_factory, preprocess
from recsys.embed.index import build_index, search


def test_pairs_stay_within_a_user_and_window():
    events = pa.table({
        "user_id": pa.array([2, 1, 1, 1, 2, 1], pa.int64()),
        "item_id": pa.array([30, 10, 20, 20, 40, 10], pa.int64()),
        "ts": pa.array([5, 1, 2, 3, 6, 9], pa.int64()),
    })
    vocab = Vocab.from_values(np.array([10, 20, 30, 40]))
    users, items = user_sequences(events, vocab)
    assert users.tolist() == [1, 1, 1, 1, 2, 2]
    assert vocab.decode(items).tolist() == [10, 20, 20, 10, 30, 40]
    pairs = vocab.decode(behaviour_pairs(users, items, window=1)).tolist()
    assert pairs == [[10, 20], [20, 10], [30, 40]]  # no self pair 20->20, no pair across users
    assert len(behaviour_pairs(users, items, window=2)) == 3 + 2  # adds 10->20 (t, t+2) and 20->10


def test_info_nce_masks_repeated_items_and_uses_the_queue():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(4, 8), dim=1)
    p = F.normalize(torch.randn(4, 8), dim=1)
    ids_a, ids_p = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    base = info_nce(a, p, ids_a, ids_p, 0.1)
    # The same positive item repeated: the duplicate must not act as a negative, so the loss drops.
    p_dup = p.clone()
    p_dup[1] = p[0]
    masked = info_nce(a, p_dup, ids_a, torch.tensor([5, 5, 7, 8]), 0.1)
    unmasked = info_nce(a, p_dup, ids_a, torch.tensor([5, 9, 7, 8]), 0.1)
    assert masked < unmasked
    queue = MemoryQueue(3, 8)
    queue.push(F.normalize(torch.randn(5, 8), dim=1), torch.tensor([11, 12, 13, 14, 15]))
    vectors, ids = queue.filled()
    assert sorted(ids.tolist()) == [13, 14, 15] and vectors.shape == (3, 8)
    assert info_nce(a, p, ids_a, ids_p, 0.1, queue) > base  # more negatives, higher loss


def test_modality_dropout_never_empties_an_item():
    mask = torch.tensor([[True, False], [True, True], [False, False]]).repeat(100, 1)
    dropped = drop_modalities(mask, 0.9, torch.Generator().manual_seed(0))
    assert (dropped <= mask).all()
    assert (dropped.any(dim=1) == mask.any(dim=1)).all()


def test_cross_modal_views_are_disjoint_and_non_empty():
    mask = torch.tensor([[True, True, False], [True, True, True], [False, True, True]]).repeat(50, 1)
    first, second = split_modalities(mask, torch.Generator().manual_seed(0))
    assert torch.equal(first | second, mask)
    assert not (first & second).any()
    assert first.any(dim=1).all() and second.any(dim=1).all()
    assert len({tuple(row) for row in first[1::3].tolist()}) == 6  # every proper split of 3 modalities


def test_alignment_pulls_pairs_together_and_handles_missing_modalities():
    torch.manual_seed(0)
    n, groups = 40, 4
    group = torch.arange(1, n + 1) % groups
    text = torch.randn(groups, 12)[group] + 0.3 * torch.randn(n, 12)
    image = torch.randn(groups, 6)[group] + 0.3 * torch.randn(n, 6)
    features = [torch.cat([torch.zeros(1, 12), text]), torch.cat([torch.zeros(1, 6), image])]
    mask = torch.ones(n + 1, 2, dtype=torch.bool)
    mask[0] = False
    mask[5, 0] = False  # item 5 has no text
    ids = np.arange(1, n + 1)
    pairs = np.array([(i, j) for i in ids for j in ids if i != j and (i % groups) == (j % groups)])
    model = train_alignment(features, mask, pairs, AlignConfig(dim=16, hidden=32, epochs=8, batch_size=64, queue_size=64))
    vectors = torch.from_numpy(project(model, features, mask))
    assert torch.count_nonzero(vectors[0]) == 0
    assert torch.allclose(vectors[1:].norm(dim=1), torch.ones(n), atol=1e-5)
    sims = vectors[1:] @ vectors[1:].T
    same = (group[:, None] == group[None, :]) & ~torch.eye(n, dtype=torch.bool)
    assert sims[same].mean() > sims[~same].mean() + 0.5
    assert sims[4][same[4]].mean() > sims[4][~same[4]].mean()  # item 5 (row 4) from its image alone


def test_alignment_model_round_trips(tmp_path):
    model = AlignmentModel([4, 3], 8, 5).eval()
    model.save(tmp_path / "align.pt")
    loaded = AlignmentModel.load(tmp_path / "align.pt")
    x, m = [torch.randn(2, 4), torch.randn(2, 3)], torch.ones(2, 2, dtype=torch.bool)
    assert torch.equal(model(x, m), loaded(x, m))


def test_item_text_and_empty_titles():
    assert item_text("Star Wars", "Action|Sci-Fi") == "Star Wars. Action, Sci-Fi"
    assert item_text("  ", "Action") is None
    items = pa.table({"item_id": [1, 2], "title": ["A", None]})
    inputs = text_inputs(items)
    assert inputs.inputs == ["A", None] and inputs.present == 1 and inputs.hashes[1] == ""


def _png(colour, size=(30, 20)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_preprocess_and_encoder():
    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5])
    x = preprocess(_png((255, 0, 0)), 16, mean, std)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))
    config = ImageConfig(enabled=True, size=16, factory_kwargs={"out_dim": 8, "width": 4})
    encoder = ImageEncoder(config, seed=0)
    vectors, ok = encoder.encode([_png((255, 0, 0)), b"not an image", _png((250, 5, 0))])
    assert ok.tolist() == [True, False, True]
    assert vectors.shape == (3, 8) and not vectors[1].any()
    assert np.allclose(np.linalg.norm(vectors[[0, 2]], axis=1), 1.0, atol=1e-5)
    # Seeded construction: a second encoder (another actor) gives the same features.
    again, _ = ImageEncoder(config, seed=0).encode([_png((255, 0, 0))])
    assert np.allclose(again[0], vectors[0], atol=1e-6)


def test_bad_image_factory_is_named():
    with pytest.raises(ValueError, match="package.module:callable"):
        load_factory("no_colon_here")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_factory("recsys.embed.image:nope")


def test_feature_cache_round_trip_and_staleness(tmp_path):
    path = tmp_path / "text.parquet"
    cache = FeatureCache(path, "fp-1")
    cache.put([1, 2], ["h1", "h2"], np.eye(2, 3, dtype=np.float32), np.array([True, False]))
    cache.save(keep={1, 2})
    reopened = FeatureCache.open(path, "fp-1")
    assert reopened.stale([1, 2, 3], ["h1", "changed", "h3"]) == [1, 2]
    vectors, ok = reopened.get([2, 1])
    assert ok.tolist() == [False, True] and vectors[1].tolist() == [1, 0, 0]
    assert len(FeatureCache.open(path, "fp-2")) == 0  # another encoder: nothing reusable


def test_config_rejects_unknown_fields(tmp_path):
    config = EmbedConfig.from_dict({"align": {"temperature": 0.05}, "image": {"mean": [0.1, 0.2, 0.3]}})
    assert config.align.temperature == 0.05 and config.image.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ConfigError, match=r"align\.temprature"):
        EmbedConfig.from_dict({"align": {"temprature": 0.05}})
    path = tmp_path / "embed.yaml"
    path.write_text("text:\n  enabled: false\ncooc:\n  dim: 32\n")
    loaded = EmbedConfig.load(path)
    assert not loaded.text.enabled and loaded.cooc.dim == 32


@pytest.mark.parametrize("threshold", [10**9, 100])
def test_index_finds_each_item_first(threshold):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(400, dtype=np.int64) * 7 + 3
    index = build_index(vectors, ids, IndexConfig(ivf_threshold=threshold, nprobe=100))
    scores, found = search(index, vectors[:20], 5)
    assert found[:, 0].tolist() == ids[:20].tolist()
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
