"""Wiring of a serving process: load the Ranker, set up alias polling, build the app.

Shared by `muse serve` (uvicorn) and the Ray Serve deployment, so both serve the same app.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from fastapi import FastAPI

from recsys.paths import DataLayout
from recsys.serving.app import ServeSettings, create_app
from recsys.serving.metrics import ServingMetrics
from recsys.serving.pool import ScoringPool
from recsys.serving.ranker import Ranker
from recsys.serving.reload import AliasPoller, ModelHolder

log = logging.getLogger(__name__)

_ALIAS_URI = re.compile(r"^models:/[^/@]+@[^/]+$")


def is_alias_uri(model_uri: str) -> bool:
    """True for `models:/NAME@ALIAS`, the only kind of URI whose target can move."""
    return bool(_ALIAS_URI.match(model_uri))


def serving_app(
    model_uri: str,
    data_dir: str | Path,
    settings: ServeSettings = ServeSettings(),
    tracking_uri: str | None = None,
    table_dtype: str = "float16",
    poll_interval_s: float = 30.0,
) -> FastAPI:
    """The ranking app for a model (registry URI or model folder) over a data folder.

    With an alias URI (`models:/muse@champion`) a background poller checks the alias every
    `poll_interval_s` seconds and hot-swaps to the version it points to (see reload.py). Sets
    torch's thread count for the process (`ServeSettings.intra_op_threads`) and does every model
    load on a scoring thread, so only the scoring threads ever run torch's parallel code.
    """
    layout = DataLayout(data_dir)
    torch.set_num_threads(settings.intra_op_threads())
    metrics = ServingMetrics()
    pool = ScoringPool(settings.scoring_threads, settings.max_concurrency, settings.timeout_ms / 1000.0,
                       metrics.in_flight)
    # Loaded (and warmed up) on a scoring thread, like every later load: see ScoringPool.call.
    ranker = pool.call(Ranker.load, model_uri, layout.root, tracking_uri, table_dtype)
    holder = ModelHolder(ranker)
    poller = None
    if is_alias_uri(model_uri) and poll_interval_s > 0:
        from recsys.train.registry import resolve_model_uri
        from recsys.train.tracking import resolve_tracking_uri

        registry = resolve_tracking_uri(layout, tracking_uri)
        poller = AliasPoller(
            holder,
            probe=lambda: str(resolve_model_uri(model_uri, registry).version),
            load=lambda: pool.call(Ranker.load, model_uri, layout.root, registry, table_dtype),
            interval_s=poll_interval_s,
        )
        log.info("watching %s every %g s for a new version", model_uri, poll_interval_s)
    return create_app(holder, settings, poller, metrics, pool)
