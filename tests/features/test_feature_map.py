"""FeatureMap, UserFeatures and FeatureBuilder.from_layout over a small data folder on disk."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.cli import UserError
from recsys.data.vocab import Vocab
from recsys.features import FeatureBuilder, FeatureConfig, FeatureMap, UserFeatures
from recsys.models import ModelConfig
from recsys.paths import DataLayout
from recsys.store.embedding_table import EmbeddingTable
from recsys.store.sequence_store import SequenceStore


@pytest.fixture
def layout(tmp_path) -> DataLayout:
    layout = DataLayout(tmp_path / "data")
    user_keys = np.array([7, 3, 9], dtype=np.int64)
    item_keys = np.array([100, 200, 300, 400], dtype=np.int64)
    Vocab(np.sort(user_keys), "user_id").save(layout.vocab("user_id"))
    Vocab(item_keys, "item_id").save(layout.vocab("item_id"))
    Vocab(np.array([5, 6]), "category_id").save(layout.vocab("category_id"))
    Vocab(np.array([20, 30, 40]), "user_age").save(layout.vocab("user_age"))
    Vocab(np.array([1, 2]), "user_gender").save(layout.vocab("user_gender"))
    # users.parquet lists user 9 first, holds an age code missing from the vocab, and a user (11)
    # that is not in the user vocab.
    pq.write_table(pa.table({
        "user_id": pa.array([9, 3, 7, 11], pa.int64()),
        "age": pa.array([40, 20, 99, 30], pa.int64()),
        "gender": pa.array([2, 1, 1, 2], pa.int64()),
    }), layout.users)
    events = pa.table({
        "user_id": pa.array([3, 3, 9], pa.int64()),
        "item_id": pa.array([100, 300, 200], pa.int64()),
        "ts": pa.array([10, 20, 30], pa.int64()),
    })
    SequenceStore.build(
        events, layout.store_dir,
        user_vocab=Vocab.load(layout.vocab("user_id")), item_vocab=Vocab.load(layout.vocab("item_id")),
        item_categories=np.array([0, 1, 2, 1, 2]),
    )
    vectors = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    EmbeddingTable.from_vectors(vectors, "float32").save(layout.embedding_table("float32"))
    return layout


def test_feature_map_reads_table_sizes(layout):
    fmap = FeatureMap.from_layout(layout)
    assert (fmap.item_vocab_size, fmap.category_vocab_size, fmap.user_vocab_size) == (5, 3, 4)
    assert fmap.user_attr_vocab_sizes == {"age": 4, "gender": 3}
    assert list(fmap.user_attr_vocab_sizes) == ["age", "gender"]  # users.parquet column order
    assert fmap.mm_dim == 6
    assert FeatureMap.from_layout(layout, user_attributes=["gender"]).user_attr_vocab_sizes == {"gender": 3}
    config = ModelConfig.from_feature_map(fmap)
    config.validate_against(fmap)
    assert config.mm_dim == 6


def test_feature_map_missing_vocab_names_the_file(layout):
    layout.vocab("category_id").unlink()
    with pytest.raises(UserError, match="category_id.parquet"):
        FeatureMap.from_layout(layout)


def test_user_features_encode_users_parquet(layout):
    users = UserFeatures.from_layout(layout)
    assert users.names == ["age", "gender"]
    # Dense users: 3 -> 1, 7 -> 2, 9 -> 3 (sorted keys). Age 99 is unknown -> 0.
    assert users.table.tolist() == [[0, 0], [1, 1], [0, 1], [3, 2]]
    assert users.lookup(torch.tensor([3, 0, 17, -1])).tolist() == [[3, 2], [0, 0], [0, 0], [0, 0]]
    with pytest.raises(UserError, match="no column"):
        UserFeatures.from_layout(layout, ["height"])


def test_builder_from_layout(layout):
    fmap = FeatureMap.from_layout(layout)
    config = ModelConfig.from_feature_map(fmap, variant="muse")
    features = FeatureConfig.for_model(config, long_len=10, short_len=4, k=2)
    assert features.gsu_policy == "muse" and features.user_attributes == ("age", "gender")
    builder = FeatureBuilder.from_layout(layout, features, table_dtype="float32")
    batch = builder.build(torch.tensor([1, 3]), torch.tensor([[2, 4], [1, 3]]), torch.tensor([25, 100]))
    assert batch.num_rows == 4
    assert batch.short_items[0].tolist() == [1, 3, 0, 0]  # user 3's two behaviours before ts 25
    assert batch.long_mask.sum(1).tolist() == [2, 2, 1, 1]
    assert batch.user_features[2].tolist() == [3, 2]
    with pytest.raises(UserError, match="table_int8"):
        FeatureBuilder.from_layout(layout, features, table_dtype="int8")
