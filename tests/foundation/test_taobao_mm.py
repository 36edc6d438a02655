"""TAOBAO-MM reader on tiny Parquet files written from the documented schema."""
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.cli import UserError, main
from recsys.data.taobao_mm import find_files, load_taobao_mm
from recsys.data.vocab import Vocab
from recsys.store import EmbeddingTable, SequenceStore

U1, U2, U3 = -(2**60), 77, 2**61  # hashed signed int64 ids
I = [-(2**50) + k * 2**40 for k in range(6)]
C = [-5, 9]


def write_source(root, label_as_list=True, split=True):
    (root / "samples").mkdir(parents=True)
    for sub in ("user_features", "item_features", "item_embeddings"):
        (root / sub).mkdir()
    label = (lambda y: [[1 - v, v] for v in y]) if label_as_list else (lambda y: y)
    label_type = pa.list_(pa.int8()) if label_as_list else pa.int8()
    train = {"label_0": pa.array(label([1, 0, 1]), label_type), "129_1": [U1, U2, U1], "205": [I[0], I[4], I[5]]}
    test = {"label_0": pa.array(label([0]), label_type), "129_1": [U1], "205": [I[1]]}
    if split:
        pq.write_table(pa.table(train), root / "samples" / "train.parquet")
        pq.write_table(pa.table(test), root / "samples" / "test.parquet")
    else:
        pq.write_table(pa.concat_tables([pa.table(train), pa.table(test)]), root / "samples" / "all.parquet")
    pq.write_table(pa.table({
        "129_1": [U1, U2],
        "130_1": [3, 4], "130_2": [0, 1], "130_3": [1, 1], "130_4": [2, 2], "130_5": [9, 8],
        "150_2_180": pa.array([[I[0], I[1], I[2]], [I[3]]], pa.list_(pa.int64())),
        "151_2_180": pa.array([[C[0], C[0], C[1]], [C[1]]], pa.list_(pa.int64())),
    }), root / "user_features" / "part-0.parquet")
    pq.write_table(pa.table({"205": [I[0], I[1]], "206": [C[0], C[0]], "213": [1, 2], "214": [5, 6]}),
                   root / "item_features" / "part-0.parquet")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 128))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    int8 = np.trunc(np.clip(vectors, -1, 1) * 127).astype(np.int8)
    pq.write_table(pa.table({"205": [I[0], I[1], I[3]], "205_c": pa.array(list(int8), pa.list_(pa.int8()))}),
                   root / "item_embeddings" / "part-0.parquet")
    return int8


def test_full_conversion(tmp_path):
    int8 = write_source(tmp_path / "src")
    layout = load_taobao_mm(tmp_path / "src", tmp_path / "data")
    events = pl.read_parquet(layout.events).sort("user_id", "ts")
    assert events.filter(pl.col("user_id") == U1)["item_id"].to_list() == [I[0], I[1], I[2]]
    assert events.filter(pl.col("user_id") == U1)["ts"].to_list() == [0, 1, 2]
    imp = pl.read_parquet(layout.impressions)
    # U1 has 3 behaviours: its samples follow them in file order, test after train.
    assert imp.filter(pl.col("user_id") == U1).select("item_id", "ts", "label").rows() == [
        (I[0], 3, 1), (I[5], 4, 1), (I[1], 5, 0)]
    assert imp.filter(pl.col("user_id") == U2)["ts"].to_list() == [1]
    items = pl.read_parquet(layout.items).sort("item_id")
    cats = dict(zip(items["item_id"].to_list(), items["category_id"].to_list()))
    assert cats[I[0]] == C[0] and cats[I[2]] == C[1] and cats[I[3]] == C[1] and cats[I[5]] == 0
    assert set(items.columns) >= {"213", "214"}
    users = pl.read_parquet(layout.users)
    assert users.columns == ["user_id", "130_1", "130_2", "130_3", "130_4", "130_5"]

    store = SequenceStore.open(layout.store_dir)
    user_vocab, item_vocab = Vocab.load(layout.vocab("user_id")), Vocab.load(layout.vocab("item_id"))
    u1 = user_vocab.encode(np.array([U1, U1]))
    batch = store.history(u1, np.array([3, 1]), max_len=10, trim=True)
    assert item_vocab.decode(batch.item_ids[0, :3].numpy()).tolist() == [I[0], I[1], I[2]]
    assert batch.lengths.tolist() == [3, 1]

    table = EmbeddingTable.load(layout.embedding_table("int8"))
    dense = item_vocab.encode(np.array([I[0], I[1], I[3]]))
    assert torch.equal(table.weights[torch.from_numpy(dense)], torch.from_numpy(int8))  # exactly the source bytes
    assert table.scale == pytest.approx(1 / 127)
    assert not table.weights[int(item_vocab.encode(np.array([I[2]]))[0])].any()  # no embedding: zero row
    table.validate()
    EmbeddingTable.load(layout.embedding_table("float16")).validate()


def test_variants_scalar_labels_and_single_sample_file(tmp_path):
    write_source(tmp_path / "src", label_as_list=False, split=False)
    layout = load_taobao_mm(tmp_path / "src", tmp_path / "data")
    assert pl.read_parquet(layout.impressions)["label"].to_list() == [1, 0, 1, 0]


def test_files_are_found_by_columns(tmp_path):
    write_source(tmp_path / "src")
    (tmp_path / "src" / "item_embeddings" / "part-0.parquet").rename(tmp_path / "src" / "emb.parquet")
    found = find_files(tmp_path / "src")
    assert [p.name for p in found.samples] == ["train.parquet", "test.parquet"]
    assert [p.name for p in found.embeddings] == ["emb.parquet"]
    assert len(found.user_features) == 1 and len(found.item_features) == 1


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        find_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="found no samples or user_features files"):
        find_files(tmp_path / "empty")
    write_source(tmp_path / "src")
    pq.write_table(pa.table({"label_0": pa.array([[1, 0, 0]], pa.list_(pa.int8())), "129_1": [U1], "205": [I[0]]}),
                   tmp_path / "src" / "samples" / "zz.parquet")
    with pytest.raises(UserError, match="one-hot pair"):
        load_taobao_mm(tmp_path / "src", tmp_path / "data")


def test_cli(tmp_path):
    write_source(tmp_path / "src")
    assert main(["data", "taobao-mm", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "d"),
                 "--max-per-user", "2"]) == 0
    assert SequenceStore.open(tmp_path / "d" / "store").max_per_user == 2
