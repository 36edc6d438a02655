"""Trainer behaviour: deterministic streaming, exact resume, divergence stop, config errors."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from recsys.cli import UserError
from recsys.train.api import train_model
from recsys.train.config import TrainConfig
from recsys.train.dataset import ImpressionStream, Requests, make_loader
from recsys.train.split import ensure_time_split
from recsys.train.trainer import Trainer, TrainingDiverged


def _requests_stream(layout, batch_size=50, seed=3) -> ImpressionStream:
    split = ensure_time_split(layout)
    return ImpressionStream([split.train], batch_size, lambda: None, layout.vocab("user_id"), layout.vocab("item_id"),
                            shuffle=True, seed=seed, build_in_workers=False)


def _flatten(stream, workers):
    return [(r.users.tolist(), r.candidates.flatten().tolist()) for r in make_loader(stream, workers)]


def test_stream_order_is_fixed_by_seed_and_epoch_whatever_the_workers(tiny_data):
    stream = _requests_stream(tiny_data)
    stream.set_position(epoch=1)
    alone = _flatten(stream, 0)
    assert _flatten(stream, 2) == alone
    assert sum(len(users) for users, _ in alone) == stream.num_rows
    stream.set_position(epoch=1, start_batch=5)
    assert _flatten(stream, 2) == alone[5:]
    stream.set_position(epoch=0)
    assert _flatten(stream, 0) != alone  # a new epoch reshuffles


def test_short_row_group_tails_join_the_batch_before(tiny_data):
    sizes = [b.stop - b.start for b in _requests_stream(tiny_data, batch_size=100).plan()]
    assert sizes == [100] * 13 + [140]  # 1,440 rows: a 40-row tail would be under half a batch
    sizes = [b.stop - b.start for b in _requests_stream(tiny_data, batch_size=64).plan()]
    assert sizes == [64] * 22 + [32]


def _config(**changes) -> TrainConfig:
    base = dict(model="muse", batch_size=256, eval_batch_size=256, epochs=2, history_len=40, short_len=8, top_k=8,
                num_workers=0, threads=1, log_every=2, dense_lr=3e-3, sparse_lr=3e-2, embedding_dim=8,
                model_options={"tower_hidden": [32, 16], "din_hidden": [16], "attention_dim": 8})
    return TrainConfig.from_dict({**base, **changes})


def test_resume_gives_the_same_weights_and_metrics_as_an_uninterrupted_run(tiny_data, tmp_path):
    full = train_model(tiny_data, _config(), out_dir=tmp_path / "full", track=False, progress=False)
    # Stop mid second epoch (6 steps per epoch), then resume with a worker building the batches.
    part = tmp_path / "part"
    train_model(tiny_data, _config(max_steps=8, checkpoint_every=3), out_dir=part, track=False, progress=False)
    resumed = train_model(tiny_data, _config(num_workers=1), out_dir=part, resume=True, track=False, progress=False)
    expected = torch.load(full.model_dir / "weights.pt", weights_only=True)
    got = torch.load(resumed.model_dir / "weights.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed.metrics["gauc"] == full.metrics["gauc"]
    assert resumed.metrics["logloss"] == full.metrics["logloss"]
    assert resumed.metrics["train_steps"] == full.metrics["train_steps"] == 12
    with pytest.raises(UserError, match=r"different config \(dense_lr: 0.003 -> 0.01\)"):
        train_model(tiny_data, _config(dense_lr=1e-2), out_dir=part, resume=True, track=False, progress=False)


class _ExplodesAtThirdStep(nn.Module):
    """Stand-in model: its logits turn NaN on the third forward pass."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, batch: Requests) -> torch.Tensor:
        self.calls += 1
        logits = self.bias.expand(batch.users.shape[0])
        return logits * float("nan") if self.calls == 3 else logits

    @staticmethod
    def loss(logits, labels):
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.reshape(-1))

    def dense_parameters(self):
        return [self.bias]

    def sparse_parameters(self):
        return []


def test_nan_loss_stops_training_and_names_the_step(tiny_data):
    trainer = Trainer(_ExplodesAtThirdStep(), _requests_stream(tiny_data), dense_lr=1e-2, sparse_lr=1e-2,
                      progress=False, prepare=lambda r: Requests(r.users, r.candidates, r.ts, r.labels.reshape(-1)))
    with pytest.raises(TrainingDiverged, match=r"step 3 \(epoch 0, batch 2\)"):
        trainer.fit()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": "transformer"}, "unknown model 'transformer'"),
        ({"learning_rate": 0.1}, r"unknown field\(s\) \['learning_rate'\]"),
        ({"batch_size": "64"}, "field 'batch_size' must be of type int"),
        ({"batch_size": 0}, "field 'batch_size' must be > 0"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"vocab_sizes": {"items": 10}}, "vocab_sizes has unknown key 'items'"),
        ({"embedding_dtype": "float64"}, "embedding_dtype"),
    ],
)
def test_config_errors_name_the_field(values, message, tmp_path):
    with pytest.raises(UserError, match=message):
        TrainConfig.from_dict(values, "exp.yaml")
    path = tmp_path / "exp.yaml"
    path.write_text("\n".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in values.items()))
    with pytest.raises(UserError, match="exp.yaml"):
        TrainConfig.from_file(path)


def test_config_errors_that_need_the_data(tiny_data, tmp_path):
    with pytest.raises(UserError, match="item_vocab_size = 5 does not cover the data"):
        train_model(tiny_data, _config(vocab_sizes={"item_vocab_size": 5}), out_dir=tmp_path, track=False, progress=False)
    shutil.rmtree(tiny_data.embedding_table("float16"))
    with pytest.raises(UserError, match="needs a multimodal embedding table"):
        train_model(tiny_data, _config(), out_dir=tmp_path, track=False, progress=False)
    with pytest.raises(UserError, match="no checkpoint"):
        train_model(tiny_data, _config(model="din"), out_dir=tmp_path / "new", resume=True, track=False, progress=False)


def test_warm_start_grows_id_tables_and_keeps_trained_rows(tiny_data, tmp_path):
    from recsys.features import FeatureMap
    from recsys.models import ModelConfig, MuseModel
    from recsys.models.io import save_model
    from recsys.train.api import _warm_start

    feature_map = FeatureMap.from_layout(tiny_data)
    yesterday = MuseModel(ModelConfig.from_feature_map(feature_map, variant="din", id_dim=8, user_dim=8))
    previous = yesterday.state_dict()
    model_dir = save_model(yesterday, tmp_path / "day1")
    grown = _warm_start(_config(model="din", warm_start=str(model_dir), vocab_sizes={"item_vocab_size": 500}),
                        feature_map, tracking_uri="")
    state = grown.state_dict()
    item_table = "sequence_embeddings.embeddings.item.weight"
    assert state[item_table].shape[0] == 500
    rows = previous[item_table].shape[0]
    assert torch.equal(state[item_table][:rows], previous[item_table])
    assert all(torch.equal(state[name], value) for name, value in previous.items() if name != item_table)
    with pytest.raises(UserError, match="it is a 'din' model, this run trains 'muse'"):
        _warm_start(_config(warm_start=str(model_dir)), feature_map, tracking_uri="")
