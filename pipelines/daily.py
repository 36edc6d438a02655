"""The daily DAG: ingest -> embed -> store -> samples -> train -> evaluate -> promote -> score.

    ingest    validate the day's events/impressions (recsys.schema), extend the catalogue and vocabularies
    embed     embeddings of new or changed items (incremental, Ray)
    store     append the day to the SequenceStore, keeping the most recent `max_history` per user
    samples   time split of the day's impressions into train/test
    train     warm start from yesterday's champion, train on the day
    evaluate  candidate and champion on the same test split
    promote   champion unless GAUC falls below the champion's by more than `gauc_margin`; MLflow registry;
              the day's data folder (hard links) for serving
    score     batch scoring of the day's candidates with the champion (Ray Data, the online Ranker)

Each stage is committed per date under the workspace (see pipelines.stage); `run_pipeline`
runs a list of dates in order and stops at the first failure.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Sequence

from pipelines.config import PipelineConfig
from pipelines.dag import DateResult, run_dates
from pipelines.stage import Stage
from pipelines.steps import embed, ingest, model, samples, score, store
from pipelines.workspace import Workspace


def _section(*names: str):
    def params(config: PipelineConfig):
        values = asdict(config)
        return {n: values[n] for n in names}
    return params


def stages() -> list[Stage]:
    """The daily DAG, in execution order."""
    return [
        Stage("ingest", ingest.run, carries=("ingest",), sources=ingest.sources,
              outputs=("events.parquet", "impressions.parquet", "items.parquet", "vocab"),
              params=_section("data_root")),
        Stage("embed", embed.run, inputs=("ingest",), carries=("embed",), outputs=("embeddings",),
              params=_section("embed_mode", "embed")),
        Stage("store", store.run, inputs=("ingest",), carries=("store",), outputs=("store/meta.json",),
              params=_section("max_history")),
        Stage("samples", samples.run, inputs=("ingest",), outputs=("train.parquet", "test.parquet"),
              params=lambda c: c.train.get("test_fraction", 0.1)),
        Stage("train", model.train, inputs=("ingest", "embed", "store", "samples"), carries=("promote",),
              outputs=("model/config.json", "metrics.json"), params=_section("train")),
        Stage("evaluate", model.evaluate, inputs=("ingest", "embed", "store", "train"), carries=("promote",),
              outputs=("evaluation.json",)),
        Stage("promote", model.promote, inputs=("ingest", "embed", "store", "train", "evaluate"),
              outputs=("decision.json", "data/store/meta.json"),
              params=_section("gauc_margin", "registered_model")),
        Stage("score", score.run, inputs=("samples", "promote"), sources=score.sources,
              outputs=("scores",), params=_section("score_batch_size")),
    ]


def run_pipeline(workspace: Workspace, dates: Sequence[dt.date], config: PipelineConfig,
                 force: frozenset[str] = frozenset()) -> list[DateResult]:
    """Run the daily DAG for `dates` (ascending) in `workspace`; see `pipelines.dag.run_dates`."""
    return run_dates(stages(), workspace, dates, config, force)
