"""End to end on the tiny folder: training lowers the loss, MLflow run, registry, champion, loading."""
from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from recsys.cli import UserError
from recsys.features import FeatureBuilder
from recsys.data.vocab import Vocab
from recsys.models.io import load_model_dir
from recsys.paths import DataLayout
from recsys.train import tracking
from recsys.train.api import train_model
from recsys.train.config import TrainConfig
from recsys.train.registry import load_registered, promote_if_better, register_model


@pytest.fixture(scope="module")
def trained(tiny_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    shutil.copytree(tiny_source.root, root / "data")
    layout = DataLayout(root / "data")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = TrainConfig.from_dict(dict(
        model="muse", batch_size=128, eval_batch_size=256, epochs=2, history_len=40, short_len=8, top_k=8,
        num_workers=0, log_every=3, dense_lr=3e-3, sparse_lr=3e-2, embedding_dim=8, registered_model="tiny-ctr",
        model_options={"tower_hidden": [32, 16], "din_hidden": [16], "attention_dim": 8},
    ))
    result = train_model(layout, config, tracking_uri=uri, progress=False)
    return layout, uri, result


def test_training_learns_and_is_tracked_registered_and_loadable(trained):
    layout, uri, result = trained
    client = MlflowClient(uri)
    losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 7  # 2 epochs of 11 steps (a 32-row tail joins the last batch), logged every 3
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05
    assert result.metrics["gauc"] > 0.6  # clicks follow a per-user category preference

    run = client.get_run(result.run_id)
    assert run.data.metrics["test_gauc"] == pytest.approx(result.metrics["gauc"])
    assert run.data.params["train.model"] == "muse"
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert {"eval/test_report.json", "eval/test_gauc_by_history_length.png", "eval/test_gauc_by_popularity.png"} <= artifacts

    assert (result.version, result.promoted) == ("1", True)
    assert str(client.get_model_version_by_alias("tiny-ctr", "champion").version) == "1"
    model, feature_config, info = load_registered("models:/tiny-ctr@champion", uri)
    assert info["version"] == "1" and info["run_id"] == result.run_id
    assert (feature_config.gsu_policy, feature_config.k, feature_config.long_len) == ("muse", 8, 40)

    # Same scores from the registry copy, the local folder and the MLflow pyfunc.
    impressions = pq.read_table(layout.root / "splits" / "time-10pct" / "test.parquet").to_pandas().head(20)
    local = load_model_dir(result.model_dir)
    builder = FeatureBuilder.from_layout(layout, feature_config, "float16")
    users = torch.from_numpy(Vocab.load(layout.vocab("user_id")).encode(impressions["user_id"].to_numpy()))
    items = torch.from_numpy(Vocab.load(layout.vocab("item_id")).encode(impressions["item_id"].to_numpy()))
    batch = builder.build(users, items.unsqueeze(1), torch.tensor(impressions["ts"].to_numpy()))
    with torch.no_grad():
        assert torch.equal(model(batch), local(batch))
        expected = torch.sigmoid(local(batch)).numpy()
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-ctr/1")
    got = pyfunc.predict(pd.DataFrame(impressions[["user_id", "item_id", "ts"]]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_champion_moves_only_past_the_margin(trained):
    layout, uri, result = trained
    gauc = result.metrics["gauc"]

    def candidate(test_gauc: float) -> str:
        with tracking.start_run(uri, "margin-test") as run:
            run.metrics({"test_gauc": test_gauc})
            model_uri = run.model(result.model_dir, {"data_dir": str(layout.root), "embedding_dtype": "float16"})
        return str(register_model(model_uri, "tiny-ctr", uri).version)

    slightly_better = candidate(gauc + 0.001)
    assert not promote_if_better("tiny-ctr", slightly_better, "gauc", margin=0.002, tracking_uri=uri)
    assert str(MlflowClient(uri).get_model_version_by_alias("tiny-ctr", "champion").version) == "1"
    assert promote_if_better("tiny-ctr", slightly_better, "gauc", margin=0.0, tracking_uri=uri)
    assert load_registered("models:/tiny-ctr@champion", uri)[2]["version"] == slightly_better

    with pytest.raises(UserError, match="expected a registry URI"):
        load_registered("runs:/abc/model", uri)
    with pytest.raises(UserError, match="not found in the registry"):
        load_registered("models:/tiny-ctr@nobody", uri)
