"""(users, candidates, ts) -> `CTRBatch`: the one input path of training, batch scoring and serving.

`FeatureBuilder.build` fetches each user's history once (point-in-time: strictly before ts),
runs the GSU once for all of that user's C candidates, and flattens the result to R = B * C rows
(row b * C + c is user b, candidate c). Every row is a function of (user, candidate, ts) alone, so
a candidate scored inside a request of 1,000 gets the same features as scored alone: the base of
online / offline parity. Sequence widths are fixed by the config (short_len, k), so batches
built separately can be concatenated.

Also here: `FeatureMap` (table sizes read from a data folder's vocabularies), `UserFeatures`
(dense user -> attribute indices) and `FeatureConfig`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import torch

from kernels import native
from recsys.cli import UserError
from recsys.data.folder import user_attribute_columns
from recsys.data.vocab import Vocab
from recsys.gsu import POLICIES as GSU_POLICIES
from recsys.gsu import select
from recsys.paths import DataLayout
from recsys.store.embedding_table import EmbeddingTable
from recsys.store.sequence_store import HistoryBatch, SequenceStore

if TYPE_CHECKING:
    from recsys.models.muse import ModelConfig


# ---------------------------------------------------------------------- batch


@dataclass(repr=False)
class CTRBatch:
    """Model input of R rows (R = B users x C candidates, flattened user-major).

    Ids are dense int64 (0 = unknown / padding), masks bool, similarities float32.

    Attributes:
        user_ids [R], user_features [R, F_u]: dense user index and attribute indices.
        target_items, target_categories [R]; target_mm float32 [R, D_mm] (zeros, or D_mm = 0,
            without an embedding table).
        short_items, short_categories [R, S], short_mask [R, S], short_mm_sims [R, S]: the S most
            recent behaviours before ts (oldest first) and their multimodal cosine to the target.
        long_items, long_categories [R, K], long_mask [R, K], long_sims [R, K] (GSU score),
            long_mm_sims [R, K] (multimodal cosine to the target): the GSU top-K, best first.
        history_lengths [R]: behaviours the user had before ts (uncapped).
        labels float32 [R] or None.
        request_index [R]: which of the B requests (users) a row belongs to.
    """

    user_ids: torch.Tensor
    user_features: torch.Tensor
    target_items: torch.Tensor
    target_categories: torch.Tensor
    target_mm: torch.Tensor
    short_items: torch.Tensor
    short_categories: torch.Tensor
    short_mask: torch.Tensor
    short_mm_sims: torch.Tensor
    long_items: torch.Tensor
    long_categories: torch.Tensor
    long_mask: torch.Tensor
    long_sims: torch.Tensor
    long_mm_sims: torch.Tensor
    history_lengths: torch.Tensor
    request_index: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.target_items.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (
            f"CTRBatch(rows={self.num_rows}, short={self.short_items.shape[1]}, long={self.long_items.shape[1]}, "
            f"mm_dim={self.target_mm.shape[1]}, user_features={self.user_features.shape[1]}, "
            f"labels={'yes' if self.labels is not None else 'no'}, device={self.target_items.device})"
        )

    def _map(self, fn) -> CTRBatch:
        return CTRBatch(
            **{
                f.name: (None if (value := getattr(self, f.name)) is None else fn(value))
                for f in dataclasses.fields(self)
            }
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CTRBatch:
        """A copy with every tensor on `device` (non_blocking pays off from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CTRBatch:
        """Page-locked copy; torch's DataLoader calls this itself when pin_memory=True."""
        return self._map(lambda t: t.pin_memory())

    def select(self, rows: torch.Tensor) -> CTRBatch:
        """The rows at `rows` (LongTensor or bool mask [R]); request_index is kept as is."""
        return self._map(lambda t: t[rows])

    @staticmethod
    def concat(batches: list[CTRBatch]) -> CTRBatch:
        """Rows of several batches back to back (a DataLoader collate_fn).

        request_index is shifted so requests of different batches stay distinct. Labels are
        kept only if every batch has them.
        """
        if not batches:
            raise ValueError("CTRBatch.concat needs at least one batch")
        shifted, offset = [], 0
        for batch in batches:
            shifted.append(batch.request_index + offset)
            if batch.num_rows:
                offset += int(batch.request_index.max()) + 1
        fields: dict[str, Any] = {}
        for f in dataclasses.fields(CTRBatch):
            if f.name == "request_index":
                fields[f.name] = torch.cat(shifted)
            elif f.name == "labels":
                labels = [b.labels for b in batches]
                fields[f.name] = None if any(x is None for x in labels) else torch.cat(labels)
            else:
                parts = [getattr(b, f.name) for b in batches]
                widths = {tuple(p.shape[1:]) for p in parts}
                if len(widths) > 1:
                    raise ValueError(
                        f"CTRBatch.concat: field {f.name!r} has different widths {sorted(widths)}; "
                        "batches must come from the same FeatureConfig"
                    )
                fields[f.name] = torch.cat(parts)
        return CTRBatch(**fields)


# ---------------------------------------------------------------------- data-folder lookups


def _vocab_rows(layout: DataLayout, name: str) -> int:
    path = layout.vocab(name)
    if not path.exists():
        raise UserError(f"{path}: vocabulary not found (build the data folder first)")
    return int(pq.read_metadata(path).num_rows) + 1


@dataclass(frozen=True)
class FeatureMap:
    """Table sizes (rows = N + 1, row 0 unknown) of every id feature of a data folder.

    Attributes:
        item_vocab_size, category_vocab_size, user_vocab_size: table rows.
        user_attr_vocab_sizes: attribute name -> table rows, in users.parquet column order.
        mm_dim: width of the multimodal embedding table, None when the folder has none.
    """

    item_vocab_size: int
    category_vocab_size: int
    user_vocab_size: int
    user_attr_vocab_sizes: dict[str, int]
    mm_dim: int | None = None

    @classmethod
    def from_layout(cls, layout: DataLayout, user_attributes: list[str] | None = None) -> FeatureMap:
        """Read sizes from `vocab/` (Parquet metadata only) and the embedding table's meta.json.

        user_attributes: attribute columns to use (default: every attribute of users.parquet).
        """
        attrs = user_attribute_columns(layout) if user_attributes is None else list(user_attributes)
        mm_dim = None
        for meta in sorted(layout.embeddings_dir.glob("table_*/meta.json")):
            mm_dim = int(json.loads(meta.read_text())["dim"])
            break
        return cls(
            item_vocab_size=_vocab_rows(layout, "item_id"),
            category_vocab_size=_vocab_rows(layout, "category_id"),
            user_vocab_size=_vocab_rows(layout, "user_id"),
            user_attr_vocab_sizes={a: _vocab_rows(layout, f"user_{a}") for a in attrs},
            mm_dim=mm_dim,
        )


class UserFeatures:
    """Dense user index -> dense attribute indices.

    Args:
        table: LongTensor [U + 1, F]; row 0 (unknown user) is all zeros.
        names: the F attribute names, in column order.
    """

    def __init__(self, table: torch.Tensor, names: list[str]):
        if table.dim() != 2 or table.shape[1] != len(names):
            raise ValueError(f"user feature table must be [U + 1, {len(names)}], got {tuple(table.shape)}")
        self.table = table.long()
        self.names = list(names)

    @property
    def num_attributes(self) -> int:
        return len(self.names)

    def lookup(self, users: torch.Tensor) -> torch.Tensor:
        """users LongTensor [B] -> LongTensor [B, F]; users outside the table get zeros (unknown)."""
        inside = (users >= 0) & (users < self.table.shape[0])
        rows = self.table[torch.where(inside, users, torch.zeros_like(users))]
        return rows * inside.unsqueeze(1).to(rows.dtype)

    @classmethod
    def from_layout(cls, layout: DataLayout, user_attributes: list[str] | None = None) -> UserFeatures:
        """Encode users.parquet with the folder's vocabularies (user_id and user_<attr>)."""
        attrs = user_attribute_columns(layout) if user_attributes is None else list(user_attributes)
        user_vocab = Vocab.load(layout.vocab("user_id"))
        table = np.zeros((user_vocab.size, len(attrs)), dtype=np.int64)
        if attrs:
            if not layout.users.exists():
                raise UserError(f"{layout.users}: not found, but user attributes {attrs} were asked for")
            available = set(user_attribute_columns(layout))
            missing = [a for a in attrs if a not in available]
            if missing:
                raise UserError(f"{layout.users}: no column(s) {missing}; it has {sorted(available)}")
            users = pq.read_table(layout.users, columns=["user_id", *attrs])
            dense = user_vocab.encode(users.column("user_id").to_numpy())
            known = dense > 0
            for j, attr in enumerate(attrs):
                column = users.column(attr)
                if column.null_count:
                    raise UserError(f"{layout.users}: column {attr!r} has {column.null_count} null(s)")
                codes = Vocab.load(layout.vocab(f"user_{attr}")).encode(column.to_numpy())
                table[dense[known], j] = codes[known]
        return cls(torch.from_numpy(table), attrs)


# ---------------------------------------------------------------------- builder


@dataclass
class FeatureConfig:
    """How a batch is cut from the data.

    Attributes:
        long_len: history fetched per user for the GSU (most recent behaviours before ts).
        short_len: S, the recent behaviours of the short-term branch.
        k: K, behaviours the GSU keeps per candidate.
        gsu_policy: "muse", "sim-hard", "sim-soft", or None for no long-term selection (K = 0).
        user_attributes: user attribute columns, in the model's order.
    """

    long_len: int = 1000
    short_len: int = 50
    k: int = 50
    gsu_policy: str | None = "muse"
    user_attributes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.user_attributes = tuple(self.user_attributes)
        if self.gsu_policy is not None and self.gsu_policy not in GSU_POLICIES:
            raise ValueError(f"FeatureConfig.gsu_policy {self.gsu_policy!r} is not one of {GSU_POLICIES} or None")
        for name in ("long_len", "short_len", "k"):
            if getattr(self, name) < 0:
                raise ValueError(f"FeatureConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.gsu_policy is not None and self.short_len > self.long_len:
            raise ValueError(
                f"FeatureConfig.short_len ({self.short_len}) must not exceed long_len ({self.long_len}): "
                "the short sequence is cut from the long history"
            )

    @property
    def fetch_len(self) -> int:
        """Behaviours fetched per user: the long history with a GSU, else the short sequence."""
        return self.long_len if self.gsu_policy is not None else self.short_len

    @classmethod
    def for_model(cls, model_config: ModelConfig, **overrides: Any) -> FeatureConfig:
        """The feature config matching a `ModelConfig`: its GSU policy and user attributes."""
        base = {
            "gsu_policy": model_config.spec.gsu_policy,
            "user_attributes": tuple(model_config.user_attr_vocab_sizes),
        }
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["user_attributes"] = list(self.user_attributes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"FeatureConfig: unknown fields {unknown}; valid: {sorted(known)}")
        return cls(**data)


def _as_long(name: str, values: Any) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"FeatureBuilder.build: {name} must hold integers, got {tensor.dtype}")
    return tensor.long()


# Elements of one [users, C, M, D] product in `_cosines` (2 MiB of float32): pieces this small
# stay in cache, so the gather, normalisation, product and sum do not each stream through memory
# (measured against 64 MiB pieces: 1,000 candidates x 50 selected items 21-29 -> 10 ms, 1,024
# users x 50 items 18-30 -> 10 ms; 100 candidates x 50 items ~0.8 ms either way).
_COSINE_CHUNK_ELEMENTS = 1 << 19


def _cosines(table: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cosine of each target's vector with each of its rows' vectors, identical bits at any batch shape.

    Args:
        table: [N+1, D] item vectors as stored (float32 / float16 / bfloat16 / int8: a scale
            cancels in a cosine); ids outside it, and zero rows, are unknown items.
        targets: LongTensor [B, C].
        ids: LongTensor [B, M] (rows shared by a user's C targets) or [B, C, M].

    Returns:
        float32 [B, C, M]; 0 where either vector is zero.

    A matmul's result bits depend on the batch shape (its blocking does), which would make a
    candidate scored in a request of 1,000 differ from the same candidate scored alone. Here every
    pair is reduced the same way whatever the batch, so these cosines are bit-identical online and
    offline: in one native call where the CPU kernels are built (`kernels.native.pair_cosines`;
    benchmarks/cosines.py: 12-20x faster for 100 to 1,000 candidates, or 256 users, x 50
    behaviours of their own, ~4x for 50 shared ones), else as an elementwise product summed over
    the contiguous last dim, in cache-sized pieces.
    """
    if native.available() and native.pair_cosines_accepts(table):
        return native.pair_cosines(table, targets.cpu(), ids.cpu())
    rows_known = table.shape[0]

    def lookup(dense: torch.Tensor) -> torch.Tensor:
        return table[_unknown_beyond(dense, rows_known)].float()

    dim = table.shape[1]
    b, c = targets.shape
    m = ids.shape[-1]
    out = torch.zeros(b, c, m)
    if out.numel() == 0:
        return out
    pairs = max(1, _COSINE_CHUNK_ELEMENTS // max(1, m * dim))  # (user, target) pairs per piece
    users_per_piece, targets_per_piece = (pairs // c, c) if pairs >= c else (1, pairs)
    for start in range(0, b, users_per_piece):
        users = slice(start, start + users_per_piece)
        shared = None if ids.dim() == 3 else _unit(lookup(ids[users])).unsqueeze(1)  # [b, 1, M, D]
        for first in range(0, c, targets_per_piece):
            cands = slice(first, first + targets_per_piece)
            target = _unit(lookup(targets[users, cands])).unsqueeze(2)  # [b, c, 1, D]
            rows = shared if shared is not None else _unit(lookup(ids[users, cands]))  # [b, c or 1, M, D]
            out[users, cands] = (target * rows).sum(-1)
    return out


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (float32 [..., D]); zero rows (unknown items) stay zero."""
    vectors = vectors.float()
    norms = (vectors * vectors).sum(-1, keepdim=True).sqrt()
    return vectors / norms.clamp_min(torch.finfo(torch.float32).tiny)


def _cpu_constant(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` detached on the CPU: itself when it already is, so that the GSU kernel's per-table
    copies, kept for the same tensor object, are built once for a scorer's fixed id table."""
    return tensor if tensor.device.type == "cpu" and not tensor.requires_grad else tensor.detach().cpu()


def _unknown_beyond(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """Ids outside [0, rows) -> 0 (unknown)."""
    return torch.where((ids >= 0) & (ids < rows), ids, torch.zeros_like(ids))


def _pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """[..., W] -> [..., width], cut or zero/False-padded on the right."""
    have = values.shape[-1]
    if have >= width:
        return values[..., :width]
    pad = torch.zeros(*values.shape[:-1], width - have, dtype=values.dtype, device=values.device)
    return torch.cat([values, pad], dim=-1)


class FeatureBuilder:
    """Turns requests into `CTRBatch`es.

    Args:
        store: the SequenceStore (histories and the item -> category map).
        table: multimodal EmbeddingTable; required by the "muse" policy, optional otherwise
            (without one, target_mm is [R, 0] and the mm similarities are zero).
        user_features: attribute lookup; None gives user_features [R, 0].
        config: FeatureConfig.
    """

    def __init__(
        self,
        store: SequenceStore,
        table: EmbeddingTable | None,
        user_features: UserFeatures | None,
        config: FeatureConfig,
    ):
        if config.gsu_policy == "muse" and table is None:
            raise ValueError("FeatureBuilder: the 'muse' GSU policy needs a multimodal EmbeddingTable")
        if user_features is not None and tuple(user_features.names) != config.user_attributes:
            raise ValueError(
                f"FeatureBuilder: user features hold attributes {user_features.names}, "
                f"FeatureConfig.user_attributes is {list(config.user_attributes)}"
            )
        if user_features is None and config.user_attributes:
            raise ValueError(
                f"FeatureBuilder: FeatureConfig.user_attributes {list(config.user_attributes)} need a UserFeatures"
            )
        self.store = store
        self.table = table
        self.user_features = user_features
        self.config = config

    @classmethod
    def from_layout(
        cls, layout: DataLayout, config: FeatureConfig, table_dtype: str | None = "float16"
    ) -> FeatureBuilder:
        """Open a data folder's store, embedding table (`table_<dtype>`, None for none) and users."""
        table = None
        if table_dtype is not None:
            path = layout.embedding_table(table_dtype)
            if not path.exists():
                raise UserError(f"{path}: embedding table not found (run `muse embed` first)")
            table = EmbeddingTable.load(path)
        users = UserFeatures.from_layout(layout, list(config.user_attributes)) if config.user_attributes else None
        return cls(SequenceStore(layout.store_dir), table, users, config)

    def _check(self, users, candidates, ts, labels) -> tuple[torch.Tensor, ...]:
        users, candidates, ts = _as_long("users", users), _as_long("candidates", candidates), _as_long("ts", ts)
        if users.dim() != 1:
            raise ValueError(f"FeatureBuilder.build: users must be [B], got shape {tuple(users.shape)}")
        b = users.shape[0]
        if candidates.dim() != 2 or candidates.shape[0] != b:
            raise ValueError(f"FeatureBuilder.build: candidates must be [B={b}, C], got shape {tuple(candidates.shape)}")
        if ts.shape != (b,):
            raise ValueError(f"FeatureBuilder.build: ts must be [B={b}], got shape {tuple(ts.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != candidates.shape:
                raise ValueError(
                    f"FeatureBuilder.build: labels must be [B, C] = {tuple(candidates.shape)}, got {tuple(labels.shape)}"
                )
            labels = labels.float()
        return users, candidates, ts, labels

    def build(
        self,
        users: torch.Tensor,
        candidates: torch.Tensor,
        ts: torch.Tensor,
        labels: torch.Tensor | None = None,
        id_embeddings: torch.Tensor | None = None,
    ) -> CTRBatch:
        """Build the batch of B requests x C candidates.

        Args:
            users: LongTensor [B], dense user indices.
            candidates: LongTensor [B, C], dense item indices.
            ts: LongTensor [B], request time: only behaviours strictly before it are used.
            labels: [B, C] 0/1, or None when scoring.
            id_embeddings: float [N+1, d], the model's item id table (the "sim-soft" policy only;
                copied to the CPU when it lives elsewhere).

        Returns:
            CTRBatch with R = B * C rows on the CPU.
        """
        users, candidates, ts, labels = self._check(users, candidates, ts, labels)
        cfg = self.config
        b, c = candidates.shape
        rows = b * c

        def flat(per_user: torch.Tensor) -> torch.Tensor:
            """[B, ...] -> [R, ...]: each user's value repeated for its C candidates."""
            return per_user.repeat_interleave(c, dim=0)

        history = self.store.history(users, ts, cfg.fetch_len)
        item_categories = self.store.item_categories  # row 0 (unknown item) is category 0
        cand_cats = item_categories[_unknown_beyond(candidates, item_categories.shape[0])]

        short = history.recent(cfg.short_len)
        short_mask = short.mask()
        target_mm = self._mm(candidates)  # [B, C, D]
        short_mm_sims = self._mm_cosines(candidates, short.item_ids).masked_fill(~short_mask.unsqueeze(1), 0.0)

        if cfg.gsu_policy is None or cfg.k == 0:
            empty_ids = torch.zeros(rows, 0, dtype=torch.long)
            long = {
                "long_items": empty_ids,
                "long_categories": empty_ids.clone(),
                "long_mask": torch.zeros(rows, 0, dtype=torch.bool),
                "long_sims": torch.zeros(rows, 0),
                "long_mm_sims": torch.zeros(rows, 0),
            }
        else:
            long = self._select(history, candidates, cand_cats, id_embeddings, rows)

        user_attrs = (
            self.user_features.lookup(users) if self.user_features is not None else torch.zeros(b, 0, dtype=torch.long)
        )
        return CTRBatch(
            user_ids=flat(users),
            user_features=flat(user_attrs),
            target_items=candidates.reshape(rows),
            target_categories=cand_cats.reshape(rows),
            target_mm=target_mm.reshape(rows, -1),
            short_items=flat(short.item_ids),
            short_categories=flat(short.category_ids),
            short_mask=flat(short_mask),
            short_mm_sims=short_mm_sims.reshape(rows, -1),
            **long,
            history_lengths=flat(self.store.count_before(users, ts)),
            request_index=flat(torch.arange(b)),
            labels=None if labels is None else labels.reshape(rows),
        )

    def _mm(self, ids: torch.Tensor) -> torch.Tensor:
        """Multimodal vectors float32 [..., D] of dense item ids (D = 0 without a table)."""
        if self.table is None:
            return torch.zeros(*ids.shape, 0)
        return self.table.lookup(ids)

    def _mm_cosines(self, targets: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Multimodal cosines [B, C, M] of targets [B, C] with items [B, M] or [B, C, M]; zeros without a table."""
        if self.table is None:
            return torch.zeros(*targets.shape, ids.shape[-1])
        return _cosines(self.table.weights, targets, ids)

    def _select(
        self,
        history: HistoryBatch,
        candidates: torch.Tensor,
        cand_cats: torch.Tensor,
        id_embeddings: torch.Tensor | None,
        rows: int,
    ) -> dict[str, torch.Tensor]:
        """GSU top-K of every (user, candidate), padded to exactly K columns, flattened to [R, K]."""
        cfg = self.config
        if cfg.gsu_policy == "sim-soft" and id_embeddings is None:
            raise ValueError("FeatureBuilder.build: the 'sim-soft' policy needs id_embeddings (model.item_id_embeddings())")
        # Ids newer than an embedding table (vocab extended after it was built) have no vector:
        # they are read as 0, which the GSU never selects and scores as "no embedding".
        gsu_ids = _cpu_constant(id_embeddings) if cfg.gsu_policy == "sim-soft" else None
        limits = [t.shape[0] for t in (self.table.weights if self.table is not None else None, gsu_ids) if t is not None]
        if limits:
            rows_known = min(limits)
            candidates = _unknown_beyond(candidates, rows_known)
            if history.item_ids.numel() and int(history.item_ids.max()) >= rows_known:
                history = dataclasses.replace(history, item_ids=_unknown_beyond(history.item_ids, rows_known))
        selection = select(
            cfg.gsu_policy,
            history,
            candidates,
            cand_cats,
            cfg.k,
            table=self.table,
            id_embeddings=gsu_ids,
        )
        mask = _pad_columns(selection.mask, cfg.k).reshape(rows, cfg.k)

        def column(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            out = _pad_columns(values.to(dtype), cfg.k).reshape(rows, cfg.k)
            return out.masked_fill(~mask, 0)

        # The GSU decides which behaviours; their similarities are recomputed here so that they do
        # not depend on how many candidates the kernel scored at once (see `_cosines`).
        mm_sims = self._mm_cosines(candidates, selection.item_ids)
        if cfg.gsu_policy == "muse":
            scores = mm_sims
        elif cfg.gsu_policy == "sim-soft":
            scores = _cosines(gsu_ids, candidates, selection.item_ids)
        else:
            scores = selection.scores
        return {
            "long_items": column(selection.item_ids, torch.long),
            "long_categories": column(selection.category_ids, torch.long),
            "long_mask": mask,
            "long_sims": column(scores, torch.float32),
            "long_mm_sims": column(mm_sims, torch.float32),
        }
