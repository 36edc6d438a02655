"""Model artifacts: a save/load round trip gives identical logits; broken folders fail clearly."""
from __future__ import annotations

import pytest
import torch

from recsys.features import FeatureConfig
from recsys.models.io import load_feature_config, load_model_config, load_model_dir, save_model
from recsys.models.muse import MuseModel


@pytest.mark.parametrize("variant", ["muse", "din"])
def test_round_trip_gives_identical_logits(tmp_path, variant, make_batch, make_config):
    torch.manual_seed(0)
    model = MuseModel(make_config(variant))
    batch = make_batch(8)
    model(batch)  # one training-mode pass moves Dice's running statistics off their init
    model.eval()
    features = FeatureConfig.for_model(model.config, long_len=100, short_len=6, k=5)
    save_model(model, tmp_path / "model", features)
    loaded = load_model_dir(tmp_path / "model")
    assert not loaded.training
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))
    assert load_feature_config(tmp_path / "model") == features


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path, make_config):
    first = MuseModel(make_config("din"))
    second = MuseModel(make_config("muse"))
    save_model(first, tmp_path / "m")
    save_model(second, tmp_path / "m")
    assert load_model_config(tmp_path / "m").variant == "muse"
    assert load_feature_config(tmp_path / "m") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_weights_must_match_config(tmp_path, make_config):
    save_model(MuseModel(make_config("muse")), tmp_path / "m")
    other = MuseModel(make_config("muse", id_dim=6))
    torch.save(other.state_dict(), tmp_path / "m" / "weights.pt")
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model_dir(tmp_path / "m")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_dir(tmp_path / "nothing")
