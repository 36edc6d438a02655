"""The embedding stage end to end through a real local Ray (num_cpus=2), on the small catalogue.

One full run (module-scoped) feeds most checks; the incremental checks copy its folder.
"""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pipelines.embed_items as stage
from embed_catalogue import BROKEN_IMAGE_ID, EMPTY_TITLE_ID, small_config, theme_of, write_catalogue
from recsys.cli import UserError, main
from recsys.data.vocab import Vocab
from recsys.embed.cache import vector_matrix
from recsys.paths import DataLayout
from recsys.store.embedding_table import EmbeddingTable


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory):
    layout = write_catalogue(tmp_path_factory.mktemp("catalogue"))
    summary = stage.embed_items(layout, small_config())
    return layout, summary


def _vectors(layout: DataLayout) -> dict[int, np.ndarray]:
    table = pq.read_table(layout.item_embeddings)
    return dict(zip(table.column("item_id").to_pylist(), vector_matrix(table.column("vector"))))


def _forbid_model_work(monkeypatch, *names: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("model work on an incremental run that should not need it")

    for name in names:
        monkeypatch.setattr(stage, name, refuse)


def test_first_run_summary(built):
    layout, summary = built
    # 32 items: one empty title; 16 image files, one of them corrupt.
    assert summary["encoded"] == {"text": 31, "image": 16}
    assert summary["cooc"] == "trained" and summary["align"] == "trained"
    assert summary["missing"] == {"text": 1, "image": 17, "cooc": 0}
    assert summary["partial"] == 18
    assert summary["no_vector"] == 0


def test_table_contract(built):
    layout, _ = built
    vocab = Vocab.load(layout.vocab("item_id"))
    fp16 = EmbeddingTable.load(layout.embedding_table("float16"))
    int8 = EmbeddingTable.load(layout.embedding_table("int8"))
    for table in (fp16, int8):
        assert table.weights.shape == (vocab.size, 128)
        assert torch.count_nonzero(table.weights[0]) == 0
    norms = fp16.as_float()[1:].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)
    # int8 holds trunc(v * 127): within 1/127 of the float value, plus fp16 rounding of the reference.
    assert (int8.as_float() - fp16.as_float()).abs().max() <= 1 / 127 + 1e-3
    embeddings = pq.read_table(layout.item_embeddings)
    assert embeddings.column("item_id").to_numpy().tolist() == vocab.keys.tolist()
    vectors = vector_matrix(embeddings.column("vector"))
    assert np.allclose(vectors, fp16.as_float()[1:].numpy(), atol=2e-3)
    assert embeddings.column("content_hash").null_count == 0


def test_items_without_title_or_image_still_get_a_vector(built):
    layout, _ = built
    vectors = _vectors(layout)
    for item in (EMPTY_TITLE_ID, BROKEN_IMAGE_ID):
        assert np.linalg.norm(vectors[item]) == pytest.approx(1.0, abs=1e-5)


def test_neighbours_share_the_theme(built):
    layout, _ = built
    vectors = _vectors(layout)
    ids = np.array(list(vectors))
    matrix = np.stack([vectors[i] for i in ids])
    scores = matrix @ matrix.T
    np.fill_diagonal(scores, -np.inf)
    top = ids[np.argsort(-scores, axis=1)[:, :3]]
    same = np.mean([theme_of(int(i)) == theme_of(int(j)) for i, row in zip(ids, top) for j in row])
    assert same >= 0.9


def test_rerun_on_unchanged_data_does_no_model_work(built, monkeypatch):
    layout, _ = built
    before = _vectors(layout)
    _forbid_model_work(monkeypatch, "encode_with_ray", "train_cooc", "train_alignment")
    summary = stage.embed_items(layout, small_config())
    assert summary["up_to_date"] is True
    assert summary["encoded"] == {"text": 0, "image": 0}
    after = _vectors(layout)
    assert all(np.array_equal(before[i], after[i]) for i in before)


def test_changed_image_is_the_only_item_encoded(built, monkeypatch, tmp_path):
    layout, _ = built
    shutil.copytree(layout.root, tmp_path / "copy")
    copy = DataLayout(tmp_path / "copy")
    from PIL import Image

    changed = 4001
    Image.fromarray(np.full((40, 48, 3), 128, dtype=np.uint8)).save(copy.root / "images" / f"{changed}.png")
    # Events and vocabulary are unchanged, so neither training step may run.
    _forbid_model_work(monkeypatch, "train_cooc", "train_alignment")
    summary = stage.embed_items(copy, small_config())
    assert summary["encoded"] == {"text": 0, "image": 1}
    assert summary["reused"] == {"text": 31, "image": 15}
    assert summary["cooc"] == "reused" and summary["align"] == "reused"
    before, after = _vectors(layout), _vectors(copy)
    assert not np.array_equal(before[changed], after[changed])
    assert all(np.array_equal(before[i], after[i]) for i in before if i != changed)


def test_duplicated_item_ids_fail_clearly(tmp_path):
    layout = write_catalogue(tmp_path)
    items = pq.read_table(layout.items)
    pq.write_table(pa.concat_tables([items, items.slice(3, 1)]), layout.items)
    with pytest.raises(UserError, match=r"items\.parquet.*item_id.*repeated"):
        stage.embed_items(layout, small_config())


def test_items_missing_from_the_vocabulary_fail_clearly(tmp_path):
    layout = write_catalogue(tmp_path)
    Vocab(Vocab.load(layout.vocab("item_id")).keys[:-2], "item_id").save(layout.vocab("item_id"))
    with pytest.raises(UserError, match="not in .*item_id.parquet"):
        stage.embed_items(layout, small_config())


def test_similar_command_prints_neighbours_with_titles(built, capsys):
    layout, _ = built
    assert main(["similar", "--data", str(layout.root), "Star Voyage 3", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "1002  Star Voyage 3"
    assert len(lines) == 4
    assert sum("Star Voyage" in line or "(no title)" in line for line in lines[1:]) >= 2
