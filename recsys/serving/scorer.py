"""What the service needs from a model: the `Scorer` protocol and its result types.

`Ranker` is the implementation; the HTTP app, the hot-reload poller and the Ray deployment are
written against this protocol only, so they never depend on how a model computes its scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class StageTimings:
    """Wall time of one scoring call, in milliseconds.

    history: raw->dense ids and the SequenceStore read; gsu: multimodal top-K selection for all
    candidates; esu: feature assembly and the CTR model forward; total: the whole call.
    """

    history_ms: float
    gsu_ms: float
    esu_ms: float
    total_ms: float

    def as_dict(self) -> dict[str, float]:
        return {"history": self.history_ms, "gsu": self.gsu_ms, "esu": self.esu_ms, "total": self.total_ms}


@dataclass(frozen=True)
class Scores:
    """Scores of one scoring call.

    probabilities: float32 [C] (score) or [B, C] (score_batch), in candidate order.
    """

    probabilities: np.ndarray
    timings: StageTimings


class Scorer(Protocol):
    @property
    def version(self) -> str:
        """Label of the model serving (the registry version, or the model folder name)."""
        ...

    def score(self, user_id: int, candidate_ids: Sequence[int], ts: int | None = None) -> Scores:
        """Click probabilities [C] of one user's candidates, in the order given."""
        ...
