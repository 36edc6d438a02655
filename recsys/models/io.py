"""Model artifacts: a folder with `config.json` + `weights.pt` (+ `features.json`).

The weights are a plain state_dict of tensors, read back with `torch.load(weights_only=True)`,
so loading a model never unpickles arbitrary objects. `features.json` holds the FeatureConfig
the model was trained with, so a server cuts its batches exactly as training did. A folder is
written under a temporary name and renamed into place: readers see the old model or the new
one, never a half-written one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from recsys.atomic import atomic_directory
from recsys.features import FeatureConfig
from recsys.models.muse import ModelConfig, MuseModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
FEATURES_FILE = "features.json"
FORMAT_VERSION = 1


def save_model(model: MuseModel, directory: str | os.PathLike, feature_config: FeatureConfig | None = None) -> Path:
    """Write `model` (and the feature config it was trained with) to `directory`, replacing it atomically."""
    with atomic_directory(directory) as tmp:
        config = {"format": FORMAT_VERSION, "model": model.config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        if feature_config is not None:
            (tmp / FEATURES_FILE).write_text(json.dumps(feature_config.to_dict(), indent=2) + "\n")
    return Path(directory)


def load_model_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a saved model folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no saved model here (missing {CONFIG_FILE})")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: model format {data.get('format')!r} is not {FORMAT_VERSION}")
    return ModelConfig.from_dict(data["model"])


def load_model_dir(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> MuseModel:
    """Rebuild a saved model in eval mode; every weight must match the config (strict load)."""
    directory = Path(directory)
    model = MuseModel(load_model_config(directory))
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: model weights missing")
    state = torch.load(weights, map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def load_feature_config(directory: str | os.PathLike) -> FeatureConfig | None:
    """The FeatureConfig saved with a model, or None if it was saved without one."""
    path = Path(directory) / FEATURES_FILE
    if not path.exists():
        return None
    return FeatureConfig.from_dict(json.loads(path.read_text()))
