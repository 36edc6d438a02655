"""Training and evaluation of the CTR models: split, streaming data, trainer, metrics, MLflow.

`train_model`, `TrainConfig` and `TrainResult` are importable from here; they load on first use,
so `import recsys.train.metrics` does not pay for torch, torchrec or MLflow.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "train_model": "recsys.train.api",
    "evaluate_on_split": "recsys.train.api",
    "TrainResult": "recsys.train.api",
    "TrainConfig": "recsys.train.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recsys.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
