"""The whole input path on a generated data folder: vocab sizes, users, store, table, model."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from recsys.data import synthetic
from recsys.data.vocab import Vocab
from recsys.features import FeatureBuilder, FeatureConfig, FeatureMap
from recsys.models import ModelConfig, MuseModel


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    config = synthetic.SyntheticConfig(users=12, history_len=60, items=400, topics=8, dim=16, impressions_per_user=4)
    return synthetic.write(config, tmp_path_factory.mktemp("synthetic") / "data")


@pytest.mark.parametrize("variant", ["muse", "din"])
def test_impressions_of_a_generated_folder_score(layout, variant):
    feature_map = FeatureMap.from_layout(layout)
    assert feature_map.mm_dim == 16
    config = ModelConfig.from_feature_map(feature_map, variant=variant, tower_hidden=(16,))
    config.validate_against(feature_map)
    features = FeatureConfig.for_model(config, long_len=60, short_len=10, k=8)
    builder = FeatureBuilder.from_layout(layout, features, table_dtype="float16" if variant == "muse" else None)

    impressions = pq.read_table(layout.impressions).slice(0, 20)
    users = torch.from_numpy(Vocab.load(layout.vocab("user_id")).encode(impressions.column("user_id").to_numpy()))
    items = torch.from_numpy(Vocab.load(layout.vocab("item_id")).encode(impressions.column("item_id").to_numpy()))
    ts = torch.tensor(impressions.column("ts").to_numpy())
    labels = torch.tensor(impressions.column("label").to_numpy()).unsqueeze(1)
    batch = builder.build(users, items.unsqueeze(1), ts, labels)

    assert batch.num_rows == 20 and (batch.user_ids > 0).all() and (batch.target_items > 0).all()
    assert batch.short_mask.any(dim=1).all()  # every impression comes after some history
    assert batch.user_features.shape[1] == len(feature_map.user_attr_vocab_sizes)
    if variant == "muse":
        assert batch.long_mask.sum(dim=1).eq(8).all()
    model = MuseModel(config)
    loss = model.loss(model(batch), batch.labels)
    loss.backward()
    assert torch.isfinite(loss)
