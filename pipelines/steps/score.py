"""score: batch scoring of the day's candidates with the champion, through the online Ranker.

Candidates: the day's candidates.parquet when the input folder has one (user_id, item_id, ts),
else the day's test impressions (so every day yields offline scores next to their labels).
Scored against promote's data/ folder, the same one the registered model and the online service
use. Output: scores/part-NNNNN.parquet (the candidate columns + score).
"""
from __future__ import annotations

import datetime as dt
import functools
import json
from pathlib import Path

from pipelines.batch_score import batch_score
from pipelines.config import PipelineConfig
from pipelines.stage import StageContext
from pipelines.steps.model import train_config


def sources(date: dt.date, config: PipelineConfig) -> dict[str, Path]:
    path = config.day_dir(date.isoformat()) / "candidates.parquet"
    return {"candidates": path} if path.is_file() else {}


def run(ctx: StageContext) -> None:
    from pipelines.ray_runtime import ensure_ray
    from recsys.serving.ranker import Ranker

    decision = json.loads((ctx.input("promote") / "decision.json").read_text())
    model_dir = ctx.workspace.root / decision["champion_model"]
    candidates = ctx.source_paths.get("candidates") or ctx.input("samples") / "test.parquet"
    factory = functools.partial(Ranker.load, str(model_dir), str(ctx.input("promote") / "data"),
                                table_dtype=train_config(ctx.config).embedding_dtype)
    ensure_ray()
    rows = batch_score(candidates, ctx.output / "scores", factory,
                       batch_size=ctx.config.score_batch_size, actors=ctx.config.score_actors)
    ctx.rows["scored"] = rows
    ctx.summary["model"] = decision["champion_model"]
