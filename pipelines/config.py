"""`PipelineConfig`: what the daily pipeline reads, and the settings of each stage (YAML or JSON).

    data_root: data/synthetic              # the folder as it was before the first date: items,
                                           # users, vocab/, store/, embeddings/ (muse data ...)
    daily_inputs: "{data_root}/daily/{date}"  # each day's events.parquet + impressions.parquet,
                                           # optional items.parquet (new/changed items) and
                                           # candidates.parquet (rows to batch score)
    max_history: 100000                    # behaviours kept per user in the store
    embed_mode: compute                    # compute (incremental embed_items) | reuse (data_root's)
    embed: {}                              # EmbedConfig fields (docs/embeddings.md)
    train: {model: muse, epochs: 1}        # TrainConfig fields (docs/training.md)
    gauc_margin: 0.001                     # promote unless GAUC < champion's - margin
    registered_model: muse-ctr
    score_batch_size: 4096
    score_actors: 1

Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import ConfigError

EMBED_MODES = ("compute", "reuse")


@dataclass
class PipelineConfig:
    data_root: str
    daily_inputs: str = "{data_root}/daily/{date}"
    max_history: int = 100_000
    embed_mode: str = "compute"
    embed: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    gauc_margin: float = 0.001
    registered_model: str = "muse-ctr"
    experiment: str = "muse-daily"
    score_batch_size: int = 4096
    score_actors: int = 1

    def __post_init__(self) -> None:
        if self.embed_mode not in EMBED_MODES:
            raise ConfigError(f"embed_mode must be one of {EMBED_MODES}, got {self.embed_mode!r}")
        if self.max_history < 1 or self.score_batch_size < 1 or self.score_actors < 1:
            raise ConfigError("max_history, score_batch_size and score_actors must be >= 1")
        if self.gauc_margin < 0:
            raise ConfigError(f"gauc_margin must be >= 0, got {self.gauc_margin}")
        if "{date}" not in self.daily_inputs:
            raise ConfigError(f"daily_inputs must contain '{{date}}', got {self.daily_inputs!r}")

    def day_dir(self, date: str) -> Path:
        return Path(self.daily_inputs.format(data_root=self.data_root, date=date))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "<config>", base: Path | None = None) -> "PipelineConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: a pipeline config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        if "data_root" not in values:
            raise ConfigError(f"{source}: field 'data_root' is required (the data folder the pipeline starts from)")
        values = dict(values)
        if base is not None and not Path(values["data_root"]).is_absolute():
            values["data_root"] = str((base / values["data_root"]).resolve())
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "PipelineConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text()
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot parse: {exc}") from None
        return cls.from_dict(values or {}, str(path), base=path.parent.resolve())
