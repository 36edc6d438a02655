"""train, evaluate, promote: the day's candidate model against the current champion.

train     warm-started from yesterday's champion model folder (fresh on the first day), trained
          on the day's train split, evaluated on its test split. Output: model/, metrics.json.
evaluate  the champion, if any, on the same test split, so both numbers are comparable.
          Output: evaluation.json {candidate, champion, champion_model}.
promote   the candidate becomes champion unless its GAUC falls below the champion's by more than
          `gauc_margin`; a promoted candidate is logged to MLflow, registered and given the
          `champion` alias. Output: decision.json (champion_model = the folder to serve and to
          warm-start tomorrow from, relative to the workspace) and data/, the day's data folder
          (hard links: tables, vocab/, store/, embeddings/) that the registered model and the
          online service score against.

The champion is read from yesterday's decision.json, never from the registry's current alias,
so re-running or backfilling a date reproduces the same decision.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from pipelines.stage import StageContext
from pipelines.steps.samples import test_fraction
from pipelines.views import assemble
from pipelines.workspace import write_json_atomic
from recsys.paths import DataLayout

log = logging.getLogger("pipelines")

CHAMPION_ALIAS = "champion"


def data_view(ctx: StageContext, dst: Path) -> DataLayout:
    """A data folder for the library's training/serving code: today's tables, store and embeddings."""
    ws, date = ctx.workspace, ctx.date
    ingest = ws.stage_dir(date, "ingest")
    return DataLayout(assemble(dst, {
        "items.parquet": ingest / "items.parquet",
        "users.parquet": ingest / "users.parquet",
        "events.parquet": ingest / "events.parquet",
        "impressions.parquet": ingest / "impressions.parquet",
        "vocab": ingest / "vocab",
        "store": ws.stage_dir(date, "store") / "store",
        "embeddings": ws.stage_dir(date, "embed") / "embeddings",
    }))


def previous_champion(ctx: StageContext) -> Path | None:
    """Yesterday's champion model folder, or None on the first day."""
    prev = ctx.previous("promote")
    if prev is None:
        return None
    decision = json.loads((prev / "decision.json").read_text())
    return ctx.workspace.root / decision["champion_model"] if decision.get("champion_model") else None


def train_config(config):
    from recsys.train.config import TrainConfig

    return TrainConfig.from_dict({**config.train, "registered_model": ""}, "pipeline config: train")


def train(ctx: StageContext) -> None:
    from recsys.train.api import train_model

    view = data_view(ctx, ctx.scratch / "data")
    champion = previous_champion(ctx)
    cfg = train_config(ctx.config).replace(warm_start=str(champion) if champion else None)
    result = train_model(view, cfg, out_dir=ctx.scratch / "train", track=False, progress=False)
    shutil.copytree(result.model_dir, ctx.output / "model")
    write_json_atomic(ctx.output / "metrics.json", result.report.to_dict())
    ctx.rows.update(train_steps=int(result.metrics.get("train_steps", 0)), test=int(result.metrics.get("samples", 0)))
    ctx.summary.update(warm_start=str(champion) if champion else None,
                       gauc=result.metrics.get("gauc"), auc=result.metrics.get("auc"))


def evaluate(ctx: StageContext) -> None:
    from recsys.models.io import load_feature_config, load_model_dir
    from recsys.train.api import evaluate_on_split

    candidate = json.loads((ctx.input("train") / "metrics.json").read_text())
    champion_dir = previous_champion(ctx)
    champion = None
    if champion_dir is not None:
        cfg = train_config(ctx.config)
        view = data_view(ctx, ctx.scratch / "data")
        report = evaluate_on_split(view, load_model_dir(champion_dir), load_feature_config(champion_dir),
                                   test_fraction=test_fraction(ctx.config), embedding_dtype=cfg.embedding_dtype,
                                   batch_size=cfg.eval_batch_size, progress=False)
        champion = report.to_dict()
    write_json_atomic(ctx.output / "evaluation.json", {
        "candidate": _scalars(candidate),
        "champion": _scalars(champion) if champion else None,
        "champion_model": _relative(ctx, champion_dir),
    })
    ctx.summary.update(candidate_gauc=candidate.get("gauc"), champion_gauc=champion.get("gauc") if champion else None)


def promote(ctx: StageContext) -> None:
    evaluation = json.loads((ctx.input("evaluate") / "evaluation.json").read_text())
    cand, champ = evaluation["candidate"], evaluation["champion"]
    margin = ctx.config.gauc_margin
    promoted = champ is None or cand["gauc"] >= champ["gauc"] - margin
    candidate_model = ctx.workspace.stage_dir(ctx.date, "train") / "model"
    decision = {
        "promoted": promoted,
        "candidate_gauc": cand["gauc"],
        "champion_gauc": champ["gauc"] if champ else None,
        "gauc_margin": margin,
        "champion_model": _relative(ctx, candidate_model) if promoted else evaluation["champion_model"],
        "reason": ("no champion yet" if champ is None else
                   f"candidate GAUC {cand['gauc']:.5f} {'>=' if promoted else '<'} champion {champ['gauc']:.5f} - margin {margin:g}"),
    }
    log.info("%s promote: %s (%s)", ctx.date, "promoted" if promoted else "kept the champion", decision["reason"])
    data_view(ctx, ctx.output / "data")
    if promoted:
        ctx.summary.update(register(ctx, candidate_model, cand))
    write_json_atomic(ctx.output / "decision.json", decision)


def register(ctx: StageContext, model_dir: Path, metrics: dict) -> dict:
    """Log, register and alias the candidate in MLflow, at most once per (date, model).

    A version tagged with this date and the train stage's output fingerprint is reused, so a
    run killed after registering and then resumed does not register the model twice.
    """
    from mlflow.tracking import MlflowClient

    from recsys.train.registry import register_model
    from recsys.train.tracking import start_run

    name = ctx.config.registered_model
    uri = ctx.workspace.tracking_uri
    ctx.workspace.mlflow_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = ctx.workspace.marker(ctx.date, "train").output_fingerprint
    client = MlflowClient(uri)
    found = [v for v in _versions(client, name)
             if v.tags.get("pipeline_dt") == ctx.date.isoformat() and v.tags.get("model_fingerprint") == fingerprint]
    if found:
        version = found[0]
        log.info("%s promote: %s version %s is already registered for this model, reusing it", ctx.date, name, version.version)
    else:
        tags = {"pipeline_dt": ctx.date.isoformat(), "model_fingerprint": fingerprint}
        with start_run(uri, ctx.config.experiment, run_name=f"daily-{ctx.date}", tags=tags) as run:
            run.metrics({f"test_{k}": v for k, v in metrics.items()})
            embedding_dtype = train_config(ctx.config).embedding_dtype
            data_dir = ctx.workspace.stage_dir(ctx.date, "promote") / "data"  # where the committed view will be
            model_uri = run.model(model_dir, {"data_dir": str(data_dir), "embedding_dtype": embedding_dtype})
        version = register_model(model_uri, name, uri, tags={**tags, "gauc": f"{metrics['gauc']:.6f}"})
        ctx.crash_point("after_register")
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    return {"registered_model": name, "version": str(version.version), "run_id": version.run_id}


def _versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return []


def _scalars(report: dict) -> dict:
    return {k: report[k] for k in ("gauc", "auc", "logloss", "samples", "gauc_users") if k in report}


def _relative(ctx: StageContext, path: Path | None) -> str | None:
    return None if path is None else str(Path(path).relative_to(ctx.workspace.root))
