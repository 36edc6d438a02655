"""Co-occurrence (I2I) item vectors: one embedding per item, trained so that items engaged close
together by the same user score high against each other (InfoNCE, in-batch negatives)."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.embed.config import CoocConfig
from recsys.embed.contrastive import info_nce

log = logging.getLogger(__name__)


def train_cooc(pairs: np.ndarray, num_rows: int, config: CoocConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train item vectors on behaviour pairs.

    Args:
        pairs: int64 [P, 2] dense item ids (see `recsys.embed.behaviour.behaviour_pairs`).
        num_rows: N + 1 (dense ids 1..N; row 0 unused).
    Returns:
        vectors float32 [N+1, config.dim] (L2-normalised, zero for items in no pair),
        present bool [N+1] (items that appear in at least one pair).
    """
    generator = torch.Generator().manual_seed(seed)
    table = nn.Embedding(num_rows, config.dim, sparse=True)
    with torch.no_grad():
        table.weight.normal_(0.0, 0.1, generator=generator)
    optimizer = torch.optim.SparseAdam(table.parameters(), lr=config.lr)
    pairs_t = torch.from_numpy(pairs)
    steps_per_epoch = max(1, (len(pairs_t) + config.batch_size - 1) // config.batch_size)
    log.info("co-occurrence: %d pairs over %d items, %d epochs of %d steps", len(pairs_t), num_rows - 1, config.epochs, steps_per_epoch)
    for epoch in range(config.epochs):
        order = torch.randperm(len(pairs_t), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = pairs_t[order[step * config.batch_size : (step + 1) * config.batch_size]]
            a, p = batch[:, 0], batch[:, 1]
            loss = info_nce(F.normalize(table(a), dim=1), F.normalize(table(p), dim=1), a, p, config.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        log.info("co-occurrence: epoch %d/%d, mean loss %.4f", epoch + 1, config.epochs, total / steps_per_epoch)
    present = np.zeros(num_rows, dtype=bool)
    present[pairs.reshape(-1)] = True
    present[0] = False
    vectors = F.normalize(table.weight.detach(), dim=1).numpy().astype(np.float32)
    vectors[~present] = 0.0
    return vectors, present
