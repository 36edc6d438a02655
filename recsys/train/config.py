"""`TrainConfig`: one config per experiment, loadable from YAML or JSON, validated field by field.

Defaults are tuned for small data (MovieLens-100K, ~90K training impressions, batch 256): the
paper's reference learning rates (dense 2e-4, sparse 2e-3) go with a global batch of 8,000 and 99M
samples; with ~350 steps per epoch those barely move the model, so the defaults here are 5x larger
(dense 1e-3, sparse 1e-2). For TAOBAO-MM-sized data set `dense_lr: 2.0e-4`, `sparse_lr: 2.0e-3`,
`batch_size: 8000`, `epochs: 1`.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from recsys.cli import UserError

EMBEDDING_DTYPES = ("float32", "float16", "bfloat16", "int8")
VOCAB_SIZE_KEYS = ("item_vocab_size", "category_vocab_size", "user_vocab_size")


@dataclass
class TrainConfig:
    """Everything that defines one training run (data folder and output folder aside)."""

    model: str = "muse"
    """Model variant: din, sim-hard, sim-soft, muse, muse-no-simtier, muse-plain-ta."""
    epochs: int = 1
    batch_size: int = 256
    eval_batch_size: int = 2048
    history_len: int = 1000
    """Longest history (behaviours before the impression) given to the GSU."""
    short_len: int = 50
    """Most recent behaviours given to the short-term (DIN) branch."""
    top_k: int = 50
    """Behaviours the GSU keeps per (user, target)."""
    embedding_dim: int = 16
    dense_lr: float = 1e-3
    sparse_lr: float = 1e-2
    weight_decay: float = 1e-4
    """AdamW weight decay of the dense parameters (embedding tables get none)."""
    grad_clip: float = 0.0
    """Clip the dense gradients' global norm to this value (0 = no clipping)."""
    seed: int = 0
    num_workers: int = 1
    """DataLoader worker processes building features (0 = in the training process)."""
    threads: int = 1
    """Intra-op torch threads of the training process. The models are small (batch x 256-wide
    tower), so extra threads gain little, while oversubscribed threads stall each other: on 2 busy
    shared cores 2 threads were 7x slower than 1 (din, batch 256: 144 vs 945 samples/s)."""
    test_fraction: float = 0.1
    embedding_dtype: str = "float16"
    """Which multimodal EmbeddingTable of the data folder to use (embeddings/table_<dtype>)."""
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    """Embedding table rows, to leave room for daily vocabulary growth: keys item_vocab_size,
    category_vocab_size, user_vocab_size (N + 1 rows each); unnamed tables fit the data exactly."""
    model_options: dict[str, typing.Any] = field(default_factory=dict)
    """Extra `ModelConfig` fields (e.g. hidden sizes), passed through as they are."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0 = run all epochs)."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps (0 = at the end of each epoch only)."""
    log_every: int = 20
    """Log the training loss to MLflow every N steps."""
    experiment: str = "muse-ctr"
    registered_model: str = "muse-ctr"
    """Registry name of the trained model ("" = do not register)."""
    promote_margin: float = 0.0
    """A new version becomes `champion` only if its GAUC beats the champion's by more than this."""
    warm_start: str = ""
    """A model directory (or models:/ URI) whose weights initialise this run."""

    @classmethod
    def from_dict(cls, values: dict, source: str = "<config>") -> TrainConfig:
        """Build and validate a config; unknown keys and wrong types raise UserError naming them."""
        if not isinstance(values, dict):
            raise UserError(f"{source}: a training config must be a mapping of field -> value, got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"{source}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        checked = {name: _coerce(value, hints[name], f"{source}: field {name!r}") for name, value in values.items()}
        config = cls(**checked)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load a .yaml/.yml/.json config file."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: config file not found")
        text = path.read_text()
        try:
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"{path}: cannot parse config: {exc}") from None
        return cls.from_dict(values or {}, str(path))

    def replace(self, **changes) -> TrainConfig:
        """A validated copy with some fields changed (None values are ignored: unset CLI flags)."""
        values = {**dataclasses.asdict(self), **{k: v for k, v in changes.items() if v is not None}}
        return TrainConfig.from_dict(values, "<overrides>")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "<config>") -> None:
        """Range checks that need no data; `model` is checked against the model registry."""
        from recsys.models.muse import VARIANTS

        if self.model not in VARIANTS:
            raise UserError(f"{source}: unknown model {self.model!r}; choose one of {list(VARIANTS)}")
        positive = ("epochs", "batch_size", "threads", "eval_batch_size", "history_len", "short_len", "top_k", "embedding_dim", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{source}: field {name!r} must be > 0, got {getattr(self, name)}")
        for name in ("dense_lr", "sparse_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"{source}: field {name!r} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "num_workers", "max_steps", "checkpoint_every", "promote_margin"):
            if getattr(self, name) < 0:
                raise UserError(f"{source}: field {name!r} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"{source}: field 'test_fraction' must be in (0, 1), got {self.test_fraction}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise UserError(f"{source}: field 'embedding_dtype' must be one of {list(EMBEDDING_DTYPES)}, got {self.embedding_dtype!r}")
        for feature, size in self.vocab_sizes.items():
            if feature not in VOCAB_SIZE_KEYS:
                raise UserError(f"{source}: vocab_sizes has unknown key {feature!r}; valid: {list(VOCAB_SIZE_KEYS)}")
            if not isinstance(size, int) or size <= 0:
                raise UserError(f"{source}: vocab_sizes[{feature!r}] must be a positive integer, got {size!r}")


def _coerce(value, hint, where: str):
    """Check `value` against a simple type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{where}: union types are not supported in TrainConfig")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise UserError(f"{where} must be of type {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value
