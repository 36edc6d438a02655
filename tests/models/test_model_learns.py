"""The multimodal signal reaches the logit: MUSE fits a label that only the similarities carry."""
from __future__ import annotations

import torch

from recsys.models import MuseModel


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float((pos[:, None] > neg[None, :]).float().mean())


def test_muse_learns_from_similarities_that_din_cannot_see(make_batch, make_config):
    torch.manual_seed(0)
    batch = make_batch(128, seed=3)
    # Click iff the GSU found a strongly similar behaviour: visible to SimTier / SA-TA only.
    batch.labels = ((batch.long_mm_sims * batch.long_mask).max(dim=1).values > 0.6).float()
    assert 0.2 < batch.labels.mean() < 0.8
    results = {}
    for variant in ("muse", "din"):
        torch.manual_seed(0)
        model = MuseModel(make_config(variant, tower_hidden=(16,), use_user_id=False))
        dense = torch.optim.AdamW(model.dense_parameters(), lr=1e-2)
        for _ in range(25):
            dense.zero_grad()
            model.loss(model(batch), batch.labels).backward()
            dense.step()
        model.eval()
        with torch.no_grad():
            results[variant] = _auc(model(batch), batch.labels)
    assert results["muse"] > 0.9
    assert results["muse"] > results["din"] + 0.1
