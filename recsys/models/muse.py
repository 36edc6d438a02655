"""The MUSE ESU CTR model and its baselines, one class switched by `ModelConfig.variant`.

Variants (what each switches on; every one has the short-term branch: DIN attention over the
recent behaviours and their mean):

| variant           | GSU policy | long-term attention          | SimTier (long + short) | target mm |
|-------------------|------------|------------------------------|------------------------|-----------|
| `din`             | none       | none (no long-term branch)   | no                     | no        |
| `sim-hard`        | sim-hard   | plain target attention       | no                     | no        |
| `sim-soft`        | sim-soft   | plain target attention       | no                     | no        |
| `muse`            | muse       | SA-TA                        | yes                    | yes       |
| `muse-no-simtier` | muse       | SA-TA                        | no                     | yes       |
| `muse-plain-ta`   | muse       | plain target attention       | yes                    | yes       |

"plain target attention" is SA-TA's ID part alone (scaled dot product, no multimodal logits).
Variants with a long-term branch also mean-pool the K selected behaviours. "target mm" feeds
the target's frozen multimodal embedding to the tower.

ID features go through torchrec: one `EmbeddingCollection` holds the item and category tables,
each shared by the target, the short sequence and the long selection; one
`EmbeddingBagCollection` holds the user id and user attribute tables. Ids at or beyond a table's
size are read as 0 (unknown): an item listed after the model was trained scores as unknown
instead of failing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.models.layers import ACTIVATIONS, MLP, DinAttention, SemanticTargetAttention, SimTier, masked_mean

if TYPE_CHECKING:
    from recsys.features import CTRBatch, FeatureMap


@dataclass(frozen=True)
class VariantSpec:
    """Which blocks a variant switches on.

    Attributes:
        gsu_policy: policy name for `recsys.gsu.select`, or None for no long-term branch.
        long_attention: "sa-ta" (fused with multimodal relevance), "ta" (ID only) or None.
        simtier: SimTier features over the long selection and the short sequence.
        target_mm: the target's multimodal embedding as a tower input.
    """

    gsu_policy: str | None
    long_attention: str | None
    simtier: bool
    target_mm: bool

    @property
    def multimodal(self) -> bool:
        """Whether the model reads multimodal similarities or embeddings from the batch."""
        return self.simtier or self.target_mm or self.long_attention == "sa-ta"


VARIANTS: dict[str, VariantSpec] = {
    "din": VariantSpec(gsu_policy=None, long_attention=None, simtier=False, target_mm=False),
    "sim-hard": VariantSpec(gsu_policy="sim-hard", long_attention="ta", simtier=False, target_mm=False),
    "sim-soft": VariantSpec(gsu_policy="sim-soft", long_attention="ta", simtier=False, target_mm=False),
    "muse": VariantSpec(gsu_policy="muse", long_attention="sa-ta", simtier=True, target_mm=True),
    "muse-no-simtier": VariantSpec(gsu_policy="muse", long_attention="sa-ta", simtier=False, target_mm=True),
    "muse-plain-ta": VariantSpec(gsu_policy="muse", long_attention="ta", simtier=True, target_mm=True),
}


def variant_spec(name: str) -> VariantSpec:
    """The spec of a variant name; ValueError listing the valid names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; valid: {', '.join(VARIANTS)}") from None


@dataclass
class ModelConfig:
    """Everything that fixes the shape of a `MuseModel`; JSON-safe through `to_dict` / `from_dict`.

    Vocabulary sizes are table rows, N + 1 with row 0 = unknown / padding (`Vocab.size`).

    Attributes:
        variant: one of `VARIANTS`.
        item_vocab_size, category_vocab_size, user_vocab_size: table rows.
        user_attr_vocab_sizes: attribute name -> table rows, in the column order of
            `CTRBatch.user_features`.
        id_dim: width of the item and category embeddings (target and behaviours share them).
        user_dim: width of the user id and user attribute embeddings.
        mm_dim: width of the frozen multimodal item embeddings (the EmbeddingTable's D).
        attention_dim: width of the long-term attention projections W_q, W_k, W_v.
        din_hidden, din_activation: the short-term DIN attention scorer.
        tower_hidden, tower_activation, dropout: the MLP tower.
        simtier_tiers: number of SimTier tiers over [-1, 1] (20 gives width 0.1).
        sata_temperature: initial SA-TA temperature.
        use_user_id: embed the user id (turn off for very large or cold user populations).
        embedding_init: embeddings start uniform in [-embedding_init, embedding_init].
        sparse_grad: embedding tables produce sparse gradients (for SparseAdam / sparse Adagrad).
    """

    item_vocab_size: int
    category_vocab_size: int
    user_vocab_size: int
    user_attr_vocab_sizes: dict[str, int] = field(default_factory=dict)
    variant: str = "muse"
    id_dim: int = 16
    user_dim: int = 16
    mm_dim: int = 128
    attention_dim: int = 32
    din_hidden: tuple[int, ...] = (64, 32)
    din_activation: str = "prelu"
    tower_hidden: tuple[int, ...] = (256, 128, 64)
    tower_activation: str = "dice"
    dropout: float = 0.0
    simtier_tiers: int = 20
    sata_temperature: float = 0.1
    use_user_id: bool = True
    embedding_init: float = 0.05
    sparse_grad: bool = True

    def __post_init__(self) -> None:
        self.din_hidden = tuple(int(w) for w in self.din_hidden)
        self.tower_hidden = tuple(int(w) for w in self.tower_hidden)
        self.user_attr_vocab_sizes = {str(k): int(v) for k, v in self.user_attr_vocab_sizes.items()}
        self.validate()

    @property
    def spec(self) -> VariantSpec:
        return variant_spec(self.variant)

    def validate(self) -> None:
        """Raise ValueError naming the first field with an impossible value."""
        variant_spec(self.variant)
        sizes = {
            "item_vocab_size": self.item_vocab_size,
            "category_vocab_size": self.category_vocab_size,
            "user_vocab_size": self.user_vocab_size,
            **{f"user_attr_vocab_sizes[{k!r}]": v for k, v in self.user_attr_vocab_sizes.items()},
        }
        for attr in self.user_attr_vocab_sizes:
            # Attribute tables are named user_<attr> next to the user_id table, as module keys.
            if not attr or "." in attr or attr == "id":
                raise ValueError(f"ModelConfig.user_attr_vocab_sizes: {attr!r} cannot name a user attribute")
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1 (N + 1 rows), got {value}")
        for name in ("id_dim", "user_dim", "attention_dim", "simtier_tiers"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.spec.multimodal and self.mm_dim < 1:
            raise ValueError(f"ModelConfig.mm_dim must be >= 1 for variant {self.variant!r}, got {self.mm_dim}")
        for name in ("din_activation", "tower_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"ModelConfig.{name} {getattr(self, name)!r} is not one of {ACTIVATIONS}")
        for name in ("din_hidden", "tower_hidden"):
            widths = getattr(self, name)
            if any(w < 1 for w in widths):
                raise ValueError(f"ModelConfig.{name} widths must be >= 1, got {widths}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.sata_temperature > 0:
            raise ValueError(f"ModelConfig.sata_temperature must be > 0, got {self.sata_temperature}")
        if not self.embedding_init > 0:
            raise ValueError(f"ModelConfig.embedding_init must be > 0, got {self.embedding_init}")

    def validate_against(self, feature_map: FeatureMap) -> None:
        """Raise ValueError when a table is too small for the data's ids or an attribute is missing."""
        needed = {
            "item_vocab_size": feature_map.item_vocab_size,
            "category_vocab_size": feature_map.category_vocab_size,
            "user_vocab_size": feature_map.user_vocab_size,
        }
        for name, rows in needed.items():
            have = getattr(self, name)
            if have < rows:
                raise ValueError(
                    f"ModelConfig.{name} = {have} does not cover the data ({rows} rows needed, "
                    f"largest dense id {rows - 1}); rebuild the config from the data's feature map"
                )
        if list(self.user_attr_vocab_sizes) != list(feature_map.user_attr_vocab_sizes):
            raise ValueError(
                f"ModelConfig.user_attr_vocab_sizes names {list(self.user_attr_vocab_sizes)} differ from "
                f"the data's user attributes {list(feature_map.user_attr_vocab_sizes)}"
            )
        for attr, rows in feature_map.user_attr_vocab_sizes.items():
            if self.user_attr_vocab_sizes[attr] < rows:
                raise ValueError(
                    f"ModelConfig.user_attr_vocab_sizes[{attr!r}] = {self.user_attr_vocab_sizes[attr]} "
                    f"does not cover the data ({rows} rows needed)"
                )
        if self.spec.multimodal and feature_map.mm_dim is not None and feature_map.mm_dim != self.mm_dim:
            raise ValueError(
                f"ModelConfig.mm_dim = {self.mm_dim} but the data's embedding table is {feature_map.mm_dim}-d"
            )

    @classmethod
    def from_feature_map(cls, feature_map: FeatureMap, **overrides: Any) -> ModelConfig:
        """A config whose tables fit the data exactly; `overrides` set any other field."""
        sizes: dict[str, Any] = {
            "item_vocab_size": feature_map.item_vocab_size,
            "category_vocab_size": feature_map.category_vocab_size,
            "user_vocab_size": feature_map.user_vocab_size,
            "user_attr_vocab_sizes": dict(feature_map.user_attr_vocab_sizes),
        }
        if feature_map.mm_dim is not None:
            sizes["mm_dim"] = feature_map.mm_dim
        return cls(**{**sizes, **overrides})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["din_hidden"] = list(self.din_hidden)
        out["tower_hidden"] = list(self.tower_hidden)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}; valid: {sorted(known)}")
        return cls(**data)


_SEQUENCE_PARTS = ("target", "short", "long")


class MuseModel(nn.Module):
    """CTR model over a `CTRBatch`: `forward(batch) -> logits [R]`.

    Tower input, in order (widths from the config; D = 2 * id_dim for item + category):
    target [D], short DIN attention [D], short mean [D], then with a long-term branch the long
    attention [attention_dim] and long mean [D], then with SimTier long and short tiers
    [2 * simtier_tiers], then target mm [mm_dim], then user embeddings [user_dim * tables].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        spec = config.spec
        self.spec = spec
        self.long_branch = spec.gsu_policy is not None
        init = {"weight_init_min": -config.embedding_init, "weight_init_max": config.embedding_init}

        parts = _SEQUENCE_PARTS if self.long_branch else _SEQUENCE_PARTS[:2]
        self.sequence_embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=table,
                    num_embeddings=rows,
                    embedding_dim=config.id_dim,
                    feature_names=[f"{part}_{table}" for part in parts],
                    **init,
                )
                for table, rows in (("item", config.item_vocab_size), ("category", config.category_vocab_size))
            ]
        )
        user_tables = ([("user_id", config.user_vocab_size)] if config.use_user_id else []) + [
            (f"user_{attr}", rows) for attr, rows in config.user_attr_vocab_sizes.items()
        ]
        self._user_table_names = [name for name, _ in user_tables]
        self._user_attr_count = len(config.user_attr_vocab_sizes)
        self.user_embeddings = (
            EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=name,
                        num_embeddings=rows,
                        embedding_dim=config.user_dim,
                        feature_names=[name],
                        pooling=PoolingType.SUM,
                        **init,
                    )
                    for name, rows in user_tables
                ]
            )
            if user_tables
            else None
        )
        if config.sparse_grad:
            for module in self._embedding_modules():
                module.sparse = True

        seq_dim = 2 * config.id_dim
        tower_in = 3 * seq_dim
        self.short_attention = DinAttention(seq_dim, config.din_hidden, config.din_activation)
        self.long_attention: SemanticTargetAttention | None = None
        if self.long_branch:
            self.long_attention = SemanticTargetAttention(
                seq_dim,
                seq_dim,
                config.attention_dim,
                fuse=spec.long_attention == "sa-ta",
                temperature=config.sata_temperature,
            )
            tower_in += config.attention_dim + seq_dim
        self.long_simtier: SimTier | None = None
        self.short_simtier: SimTier | None = None
        if spec.simtier:
            self.long_simtier = SimTier(config.simtier_tiers)
            self.short_simtier = SimTier(config.simtier_tiers)
            tower_in += 2 * config.simtier_tiers
        if spec.target_mm:
            tower_in += config.mm_dim
        tower_in += config.user_dim * len(user_tables)
        self.tower = MLP(tower_in, config.tower_hidden, config.tower_activation, config.dropout)
        self.head = nn.Linear(self.tower.out_dim, 1)
        self.tower_in_dim = tower_in

    # ------------------------------------------------------------------ parameters
    def _embedding_modules(self) -> list[nn.Module]:
        modules: list[nn.Module] = list(self.sequence_embeddings.embeddings.values())
        if self.user_embeddings is not None:
            modules += list(self.user_embeddings.embedding_bags.values())
        return modules

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The embedding tables (sparse gradients when `config.sparse_grad`): for SparseAdam / Adagrad."""
        return [module.weight for module in self._embedding_modules()]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (attention, SimTier, tower): for AdamW."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def item_id_embeddings(self) -> torch.Tensor:
        """The learned item id table, detached: float32 [N+1, id_dim] (the SIM-soft GSU input)."""
        return self.sequence_embeddings.embeddings["item"].weight.detach()

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _known(ids: torch.Tensor, rows: int) -> torch.Tensor:
        """Ids outside [0, rows) -> 0 (unknown)."""
        return torch.where((ids >= 0) & (ids < rows), ids, torch.zeros_like(ids))

    def _sequence_features(self, batch: CTRBatch) -> dict[str, torch.Tensor]:
        """Item | category embeddings per part: target [R, 1, 2*id_dim], short [R, S, ..], long [R, K, ..]."""
        cfg = self.config
        ids = {
            "target": (batch.target_items.unsqueeze(1), batch.target_categories.unsqueeze(1)),
            "short": (batch.short_items, batch.short_categories),
        }
        if self.long_branch:
            ids["long"] = (batch.long_items, batch.long_categories)
        rows = batch.target_items.shape[0]
        keys, values, lengths = [], [], []
        for table, column, vocab in (("item", 0, cfg.item_vocab_size), ("category", 1, cfg.category_vocab_size)):
            for part, pair in ids.items():
                keys.append(f"{part}_{table}")
                lengths.append(torch.full((rows,), pair[column].shape[1], dtype=torch.long, device=pair[column].device))
            # One range check per table over all its features: the KJT is key-major.
            values.append(self._known(torch.cat([pair[column].reshape(-1) for pair in ids.values()]), vocab))
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
        embedded = self.sequence_embeddings(kjt)
        out = {}
        for part, (items, _) in ids.items():
            width = items.shape[1]
            item_emb = embedded[f"{part}_item"].values().reshape(rows, width, cfg.id_dim)
            cat_emb = embedded[f"{part}_category"].values().reshape(rows, width, cfg.id_dim)
            out[part] = torch.cat([item_emb, cat_emb], dim=-1)
        return out

    def _user_features(self, batch: CTRBatch) -> torch.Tensor | None:
        """User id and attribute embeddings concatenated: [R, user_dim * tables]."""
        if self.user_embeddings is None:
            return None
        rows = batch.user_ids.shape[0]
        if batch.user_features.shape[1] != self._user_attr_count:
            raise ValueError(
                f"batch.user_features has {batch.user_features.shape[1]} columns, the model expects "
                f"{self._user_attr_count} ({list(self.config.user_attr_vocab_sizes)})"
            )
        columns = [self._known(batch.user_ids, self.config.user_vocab_size)] if self.config.use_user_id else []
        for j, rows_j in enumerate(self.config.user_attr_vocab_sizes.values()):
            columns.append(self._known(batch.user_features[:, j], rows_j))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self._user_table_names,
            values=torch.cat(columns),
            lengths=torch.ones(rows * len(columns), dtype=torch.long, device=batch.user_ids.device),
        )
        return self.user_embeddings(kjt).values()

    def forward(self, batch: CTRBatch) -> torch.Tensor:
        """batch with R rows -> logits float32 [R]."""
        seq = self._sequence_features(batch)
        target = seq["target"].squeeze(1)
        short, short_mask = seq["short"], batch.short_mask
        parts = [target, self.short_attention(target, short, short_mask), masked_mean(short, short_mask)]
        if self.long_attention is not None:
            if batch.long_mask.shape[1] == 0:
                raise ValueError(
                    f"variant {self.config.variant!r} attends over the GSU selection, but the batch has none "
                    "(K = 0): build batches with FeatureConfig.for_model(model.config)"
                )
            long, long_mask = seq["long"], batch.long_mask
            parts.append(self.long_attention(target, long, long_mask, batch.long_mm_sims))
            parts.append(masked_mean(long, long_mask))
        if self.long_simtier is not None and self.short_simtier is not None:
            parts.append(self.long_simtier(batch.long_mm_sims, batch.long_mask))
            parts.append(self.short_simtier(batch.short_mm_sims, short_mask))
        if self.spec.target_mm:
            if batch.target_mm.shape[-1] != self.config.mm_dim:
                raise ValueError(
                    f"batch.target_mm is {batch.target_mm.shape[-1]}-d, ModelConfig.mm_dim is {self.config.mm_dim}"
                )
            parts.append(batch.target_mm.float())
        user = self._user_features(batch)
        if user is not None:
            parts.append(user)
        return self.head(self.tower(torch.cat(parts, dim=-1))).squeeze(-1)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy of logits [R] against 0/1 labels [R]."""
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
