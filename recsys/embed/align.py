"""Semantic contrastive alignment (SCL): per-modality features -> one 128-d unit vector.

Each modality m has its own input layer (LayerNorm + Linear, d_m -> H); an item's hidden vector
is the mean over the modalities it has (a mask, so a missing title or image simply drops out),
then an MLP head maps it to `dim` and the result is L2-normalised. Training is InfoNCE on
behaviour pairs (consecutive engagements of one user) with in-batch negatives plus a memory
queue; modality dropout hides present modalities at random so that items which lack one at
inference still land near their neighbours.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.embed.config import AlignConfig
from recsys.embed.contrastive import MemoryQueue, info_nce

log = logging.getLogger(__name__)


class AlignmentModel(nn.Module):
    """Masked mean fusion of M modality features followed by a projection head.

    The head is linear plus a residual MLP whose last layer starts at zero, so training starts
    from a (random) linear map of the features: their geometry is kept from step one instead of
    every item starting near the same point, as a freshly initialised deep MLP would put them.

    Args:
        input_dims: d_m of each of the M modalities, in a fixed order.
        hidden: H, the shared hidden width.
        dim: output width D.
    """

    def __init__(self, input_dims: list[int], hidden: int, dim: int):
        super().__init__()
        self.input_dims = list(input_dims)
        self.hidden = hidden
        self.dim = dim
        self.inputs = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden, bias=False)) for d in input_dims
        )
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.out = nn.Linear(hidden, dim, bias=False)

    def forward(self, features: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """features: M tensors [B, d_m]; mask: bool [B, M] -> float [B, D], unit norm (zero rows where
        the mask is all False)."""
        hidden = torch.stack([layer(x) for layer, x in zip(self.inputs, features)], dim=1)  # [B, M, H]
        weight = mask.unsqueeze(-1).to(hidden.dtype)
        fused = (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # [B, H]
        out = F.normalize(self.out(fused + self.mlp(fused)), dim=-1)
        return out * mask.any(dim=1, keepdim=True).to(out.dtype)

    def save(self, path: Path) -> None:
        """Write `<path>` (state dict) and `<path>.json` (shape) so loading needs no pickle."""
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        meta = path.with_name(path.name + ".json")
        meta_tmp = meta.with_name(meta.name + ".tmp")
        meta_tmp.write_text(json.dumps({"input_dims": self.input_dims, "hidden": self.hidden, "dim": self.dim}))
        meta_tmp.replace(meta)

    @classmethod
    def load(cls, path: Path) -> "AlignmentModel":
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        model = cls(meta["input_dims"], meta["hidden"], meta["dim"])
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()


def drop_modalities(mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Hide each present modality with probability p; rows that would lose all keep their mask."""
    if p <= 0:
        return mask
    kept = mask & (torch.rand(mask.shape, generator=generator) >= p)
    return torch.where(kept.any(dim=1, keepdim=True), kept, mask)


def split_modalities(mask: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint, non-empty views of each item's modalities: bool [B, M] each.

    Rows must have at least two present modalities. The present modalities are put in random
    order and cut at a random point, so every split of a 3-modality item can occur.
    """
    scores = torch.rand(mask.shape, generator=generator).masked_fill(~mask, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)  # rank among the row's modalities, present ones first
    present = mask.sum(dim=1, keepdim=True)
    cut = 1 + (torch.rand(present.shape, generator=generator) * (present - 1)).long()  # in [1, present-1]
    first = mask & (rank < cut)
    return first, mask & ~first


def train_alignment(
    features: list[torch.Tensor],
    mask: torch.Tensor,
    pairs: np.ndarray,
    config: AlignConfig,
    seed: int = 0,
) -> AlignmentModel:
    """Fit the projection on behaviour pairs, plus cross-modal pairs when items have 2+ modalities.

    A cross-modal pair is one item seen through two disjoint sets of its modalities (say its text
    and its co-occurrence vector); asking both to land on the same point is what aligns the
    modalities with each other, and it keeps the content structure that behaviour pairs alone
    (noisy, popularity-driven) would wash out.

    Args:
        features: M tensors [N+1, d_m] indexed by dense item id (zeros where missing).
        mask: bool [N+1, M], which modalities each item has.
        pairs: int64 [P, 2] dense item ids of positive pairs.
    """
    usable = mask.any(dim=1).numpy()
    pairs = pairs[usable[pairs[:, 0]] & usable[pairs[:, 1]]]
    if len(pairs) == 0:
        raise ValueError("alignment: no behaviour pair links two items that have content; nothing to train on")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = AlignmentModel([f.shape[1] for f in features], config.hidden, config.dim)
    # The queue is filled by a slowly moving (EMA) copy of the model, as in MoCo: vectors from the
    # live model of past steps would be stale, and the model could lower the loss by drifting all
    # items away from them together (which collapses the space) instead of separating items.
    key_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    queue = MemoryQueue(config.queue_size, config.dim)
    pairs_t = torch.from_numpy(pairs)
    steps = max(1, (len(pairs_t) + config.batch_size - 1) // config.batch_size)
    multi_modal = mask.sum(dim=1) >= 2
    n_cross = int(round(config.cross_modal_ratio * config.batch_size)) if bool(multi_modal.any()) else 0
    log.info(
        "alignment: %d behaviour pairs (+ up to %d cross-modal pairs per step), %d modalities, %d epochs of %d steps",
        len(pairs_t), n_cross, len(features), config.epochs, steps,
    )

    def embed(ids: torch.Tensor, item_mask: torch.Tensor) -> torch.Tensor:
        return model([f[ids] for f in features], item_mask)

    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(pairs_t), generator=generator)
        total = 0.0
        for step in range(steps):
            batch = pairs_t[order[step * config.batch_size : (step + 1) * config.batch_size]]
            a, p = batch[:, 0], batch[:, 1]
            mask_a = drop_modalities(mask[a], config.modality_dropout, generator)
            mask_p = drop_modalities(mask[p], config.modality_dropout, generator)
            if n_cross:
                # Cross-modal items are drawn from this batch's positives, not uniformly from the
                # catalogue: negatives then keep the positives' (popularity) distribution, and the
                # model cannot lower the loss by learning "popular vs not" instead of similarity.
                candidates = p[multi_modal[p]]
                items = candidates[:n_cross]
                view_a, view_p = split_modalities(mask[items], generator)
                a, p = torch.cat([a, items]), torch.cat([p, items])
                mask_a, mask_p = torch.cat([mask_a, view_a]), torch.cat([mask_p, view_p])
            za, zp = embed(a, mask_a), embed(p, mask_p)
            loss = info_nce(za, zp, a, p, config.temperature, queue)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for key_param, param in zip(key_model.parameters(), model.parameters()):
                    key_param.lerp_(param, 1.0 - config.queue_momentum)
                queue.push(key_model([f[p] for f in features], mask_p), p)
            total += float(loss.detach())
        log.info("alignment: epoch %d/%d, mean loss %.4f", epoch + 1, config.epochs, total / steps)
    return model.eval()


@torch.inference_mode()
def project(model: AlignmentModel, features: list[torch.Tensor], mask: torch.Tensor, batch_size: int = 8192) -> np.ndarray:
    """Apply the trained projection to every row: float32 [N+1, D] (zero rows where mask is all False)."""
    out = [
        model([f[start : start + batch_size] for f in features], mask[start : start + batch_size])
        for start in range(0, mask.shape[0], batch_size)
    ]
    return torch.cat(out).numpy().astype(np.float32)
