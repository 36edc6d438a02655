"""`train_model(layout, config) -> TrainResult`: one experiment from a data folder to a registered model.

Steps: time split (cached), feature map and model config from the data, model (fresh or warm
started), streaming training with checkpoints, exact evaluation on the test split, the model
folder, and, when tracking, an MLflow run with the model logged, registered and promoted to
`champion` if it beats the current one by more than `config.promote_margin` GAUC.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import torch

from recsys.cli import UserError
from recsys.data.vocab import Vocab
from recsys.features import FeatureBuilder, FeatureConfig, FeatureMap
from recsys.memory import retain_freed_memory
from recsys.models.io import load_model_config, load_model_dir, save_model
from recsys.models.muse import ModelConfig, MuseModel, variant_spec
from recsys.paths import DataLayout
from recsys.train.config import TrainConfig
from recsys.train.dataset import ImpressionStream, Requests
from recsys.train.metrics import EvalReport
from recsys.train.split import Split, ensure_time_split
from recsys.train.trainer import Trainer, evaluate_model

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced.

    metrics: test-split scalars (gauc, auc, logloss, ...) plus train_samples_per_s.
    version: the registry version (None when not registered); promoted: it became champion.
    """

    model_dir: Path
    metrics: dict[str, float]
    report: EvalReport
    run_id: str | None
    version: str | None
    promoted: bool
    out_dir: Path


def default_out_dir(layout: DataLayout, config: TrainConfig) -> Path:
    return layout.root / "training" / f"{config.model}-seed{config.seed}"


def _table_dtype(layout: DataLayout, config: TrainConfig) -> str | None:
    """The embedding table dtype this variant reads, None if it needs none; UserError if missing."""
    spec = variant_spec(config.model)
    if not (spec.multimodal or spec.gsu_policy == "muse"):
        return None
    path = layout.embedding_table(config.embedding_dtype)
    if not path.exists():
        raise UserError(
            f"model {config.model!r} needs a multimodal embedding table, but {path} does not exist "
            f"(run `muse embed --data {layout.root}` or set embedding_dtype to a table the folder has)"
        )
    return config.embedding_dtype


def _model_config(config: TrainConfig, feature_map: FeatureMap) -> ModelConfig:
    """ModelConfig from the data's table sizes, the config's vocab_sizes and model_options."""
    overrides = {"variant": config.model, "id_dim": config.embedding_dim, "user_dim": config.embedding_dim,
                 **config.vocab_sizes, **config.model_options}
    try:
        model_config = ModelConfig.from_feature_map(feature_map, **overrides)
    except (TypeError, ValueError) as exc:
        raise UserError(f"training config: model_options/vocab_sizes do not make a valid model: {exc}") from None
    _check_covers(model_config, feature_map, "training config vocab_sizes")
    return model_config


def _check_covers(model_config: ModelConfig, feature_map: FeatureMap, where: str) -> None:
    try:
        model_config.validate_against(feature_map)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _warm_start(config: TrainConfig, feature_map: FeatureMap, tracking_uri: str) -> MuseModel:
    """A model initialised from `config.warm_start`, its id tables grown to fit the data if needed.

    Rows the previous model had keep their trained values (vocabularies only append, so dense ids
    never move); new rows keep their fresh initialisation.
    """
    source = config.warm_start
    if source.startswith("models:/"):
        from recsys.train.registry import load_registered

        previous, _, info = load_registered(source, tracking_uri)
        previous_config = previous.config
        log.info("warm start from %s (version %s)", source, info["version"])
    else:
        try:
            previous_config = load_model_config(source)
            previous = load_model_dir(source)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"warm_start {source}: {exc}") from None
    if previous_config.variant != config.model:
        raise UserError(f"warm_start {source}: it is a {previous_config.variant!r} model, this run trains {config.model!r}")
    sizes = {
        name: max(getattr(previous_config, name), config.vocab_sizes.get(name, 0), getattr(feature_map, name))
        for name in ("item_vocab_size", "category_vocab_size", "user_vocab_size")
    }
    attrs = {a: max(previous_config.user_attr_vocab_sizes.get(a, 0), n) for a, n in feature_map.user_attr_vocab_sizes.items()}
    grown = ModelConfig.from_dict({**previous_config.to_dict(), **sizes, "user_attr_vocab_sizes": attrs})
    _check_covers(grown, feature_map, f"warm_start {source}")
    model = MuseModel(grown)
    state = model.state_dict()
    for name, old in previous.state_dict().items():
        new = state.get(name)
        if new is None:
            raise UserError(f"warm_start {source}: parameter {name!r} does not exist in the new model")
        if old.shape == new.shape:
            new.copy_(old)
        elif old.dim() == 2 and old.shape[1] == new.shape[1] and old.shape[0] < new.shape[0]:
            new[: old.shape[0]].copy_(old)
        else:
            raise UserError(f"warm_start {source}: parameter {name!r} is {tuple(old.shape)}, the new model needs {tuple(new.shape)}")
    model.load_state_dict(state)
    return model


def item_popularity(split: Split, item_vocab: Vocab) -> np.ndarray:
    """int64 [item rows]: training impressions of every dense item."""
    counts = pl.read_parquet(split.train, columns=["item_id"]).group_by("item_id").len()
    dense = item_vocab.encode(counts["item_id"].to_numpy())
    out = np.zeros(item_vocab.size, dtype=np.int64)
    np.add.at(out, dense, counts["len"].to_numpy().astype(np.int64))
    out[0] = 0
    return out


def _stream(
    layout: DataLayout,
    model: MuseModel,
    feature_config: FeatureConfig,
    table_dtype: str | None,
    path: Path,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> tuple[ImpressionStream, _BuildWithModel | None]:
    """A stream over one impressions file, and the in-process builder when features need the model."""
    make_builder = functools.partial(FeatureBuilder.from_layout, layout, feature_config, table_dtype)
    in_workers = feature_config.gsu_policy != "sim-soft"
    stream = ImpressionStream([path], batch_size, make_builder, layout.vocab("user_id"), layout.vocab("item_id"),
                              shuffle=shuffle, seed=seed, build_in_workers=in_workers)
    return stream, None if in_workers else _BuildWithModel(make_builder(), model)


class _BuildWithModel:
    """Builds features in the training process with the model's current item id table (sim-soft)."""

    def __init__(self, builder: FeatureBuilder, model: MuseModel):
        self.builder, self.model = builder, model

    def __call__(self, requests: Requests):
        return self.builder.build(requests.users, requests.candidates, requests.ts, requests.labels,
                                  id_embeddings=self.model.item_id_embeddings())


def train_model(
    layout: DataLayout | str | os.PathLike,
    config: TrainConfig,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    track: bool = True,
    progress: bool = True,
    run_name: str | None = None,
) -> TrainResult:
    """Train, evaluate and (when `track`) log + register one model. See the module docstring.

    Args:
        layout: the data folder (contract tables, vocab/, store/, embeddings/).
        config: the experiment (validated TrainConfig).
        out_dir: where the checkpoint, the model folder and metrics.json go
            (default DATA/training/<model>-seed<seed>).
        resume: continue from out_dir/checkpoint.pt (same MLflow run) instead of starting over.
        tracking_uri: MLflow URI (default: MLFLOW_TRACKING_URI, else DATA/runs/mlflow.db).
        track: log to MLflow and register; False trains and evaluates only.
    Torch runs with `config.threads` intra-op threads for the call (restored after), and the
    process keeps the memory each batch frees for the next (`recsys.memory`).
    """
    layout = layout if isinstance(layout, DataLayout) else DataLayout(layout)
    config.validate()
    retain_freed_memory()
    with torch_threads(config.threads):
        return _train(layout, config, out_dir, resume, tracking_uri, track, progress, run_name)


def _train(
    layout: DataLayout,
    config: TrainConfig,
    out_dir: Path | None,
    resume: bool,
    tracking_uri: str | None,
    track: bool,
    progress: bool,
    run_name: str | None,
) -> TrainResult:
    from recsys.train import tracking  # MLflow is slow to import; untracked runs skip it

    out_dir = Path(out_dir) if out_dir else default_out_dir(layout, config)
    checkpoint = out_dir / "checkpoint.pt"
    if resume and not checkpoint.exists():
        raise UserError(f"--resume: no checkpoint at {checkpoint} (train without --resume first)")

    split = ensure_time_split(layout, config.test_fraction)
    feature_map = FeatureMap.from_layout(layout)
    table_dtype = _table_dtype(layout, config)

    registry_needed = track or config.warm_start.startswith("models:/")
    tracking_uri = tracking.resolve_tracking_uri(layout, tracking_uri) if registry_needed else None
    torch.manual_seed(config.seed)
    if config.warm_start:
        model = _warm_start(config, feature_map, tracking_uri)
    else:
        model = MuseModel(_model_config(config, feature_map))
    feature_config = FeatureConfig.for_model(
        model.config, long_len=config.history_len, short_len=min(config.short_len, config.history_len), k=config.top_k
    )
    train_stream, prepare = _stream(layout, model, feature_config, table_dtype, split.train, config.batch_size,
                                    shuffle=True, seed=config.seed)
    test_stream, _ = _stream(layout, model, feature_config, table_dtype, split.test, config.eval_batch_size)

    trainer = Trainer(
        model, train_stream, dense_lr=config.dense_lr, sparse_lr=config.sparse_lr, weight_decay=config.weight_decay,
        grad_clip=config.grad_clip, epochs=config.epochs, max_steps=config.max_steps, num_workers=config.num_workers,
        checkpoint_path=checkpoint, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
        progress=progress, prepare=prepare,
    )
    if resume:
        trainer.load_checkpoint(checkpoint)
        _check_resumable(trainer.extra.get("train_config", {}), config, checkpoint)
    trainer.extra["train_config"] = config.to_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = trainer.extra.get("mlflow_run_id") if resume else None
    tags = {"model": config.model, "data": str(layout.root.resolve())}
    run_context = tracking.start_run(tracking_uri, config.experiment, run_name or f"{config.model}-seed{config.seed}",
                                     tags=tags, run_id=run_id) if track else nullcontext(None)
    with run_context as run:
        if run is not None:
            trainer.extra["mlflow_run_id"] = run.run_id
            trainer.on_log = lambda step, loss, rate: run.metrics({"train_loss": loss, "train_samples_per_s": rate}, step=step)
            if not resume:
                run.params({"train": config.to_dict(), "model": model.config.to_dict(), "features": feature_config.to_dict(),
                            "data": {"train_rows": split.train_rows, "test_rows": split.test_rows}})
                run.json_artifact(config.to_dict(), "train_config.json")
        log.info("training %s on %d impressions (%d test), %d epoch(s), batch %d, %d worker(s)",
                 config.model, split.train_rows, split.test_rows, config.epochs, config.batch_size, config.num_workers)
        started, samples_before = time.perf_counter(), trainer.state.samples
        state = trainer.fit()
        elapsed = time.perf_counter() - started
        throughput = (state.samples - samples_before) / elapsed if elapsed > 0 else float("nan")

        report = evaluate_model(model, test_stream, item_popularity(split, Vocab.load(layout.vocab("item_id"))),
                                num_workers=config.num_workers, progress=progress, prepare=prepare)
        metrics = {**report.scalars(), "train_samples_per_s": throughput, "train_steps": float(state.step)}
        log.info("test: GAUC %.4f  AUC %.4f  logloss %.4f  (%d impressions, %d users in GAUC)",
                 report.gauc, report.auc, report.logloss, report.samples, report.gauc_users)
        model_dir = save_model(model, out_dir / "model", feature_config)
        _write_json(out_dir / "metrics.json", report.to_dict() | {"train_samples_per_s": throughput})

        version, promoted = None, False
        if run is not None:
            run.evaluation(report)
            run.metrics({"train_samples_per_s_overall": throughput})
            model_uri = run.model(model_dir, {"data_dir": str(layout.root.resolve()), "embedding_dtype": table_dtype})
            if config.registered_model:
                from recsys.train.registry import promote_if_better, register_model

                registered = register_model(model_uri, config.registered_model, tracking_uri,
                                            tags={"model": config.model, "gauc": f"{report.gauc:.6f}"})
                version = str(registered.version)
                promoted = promote_if_better(config.registered_model, version, "gauc", config.promote_margin, tracking_uri)
    return TrainResult(model_dir, metrics, report, run.run_id if run is not None else None, version, promoted, out_dir)


# Fields a resumed run may change: they do not alter the optimisation trajectory.
_RESUME_MAY_CHANGE = {"epochs", "max_steps", "num_workers", "checkpoint_every", "log_every", "eval_batch_size",
                      "experiment", "registered_model", "promote_margin"}


def _check_resumable(saved: dict, config: TrainConfig, checkpoint: Path) -> None:
    changed = sorted(k for k, v in config.to_dict().items() if k not in _RESUME_MAY_CHANGE and k in saved and saved[k] != v)
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in changed)
        raise UserError(f"--resume: {checkpoint} was trained with a different config ({detail}); "
                        "resume with the same settings or start a new run in another --out folder")


def evaluate_on_split(
    layout: DataLayout | str | os.PathLike,
    model: MuseModel,
    feature_config: FeatureConfig,
    *,
    test_fraction: float = 0.1,
    embedding_dtype: str = "float16",
    batch_size: int = 2048,
    num_workers: int = 0,
    threads: int = 1,
    progress: bool = True,
) -> EvalReport:
    """Exact metrics of a trained model on the test half of a folder's time split (the process
    keeps the memory each batch frees for the next, as in training)."""
    retain_freed_memory()
    with torch_threads(threads):
        return _evaluate(layout, model, feature_config, test_fraction, embedding_dtype, batch_size, num_workers, progress)


def _evaluate(layout, model, feature_config, test_fraction, embedding_dtype, batch_size, num_workers, progress) -> EvalReport:
    layout = layout if isinstance(layout, DataLayout) else DataLayout(layout)
    split = ensure_time_split(layout, test_fraction)
    needs_table = model.spec.multimodal or feature_config.gsu_policy == "muse"
    table_dtype = embedding_dtype if needs_table else None
    if table_dtype and not layout.embedding_table(table_dtype).exists():
        raise UserError(f"{layout.embedding_table(table_dtype)}: this {model.config.variant!r} model needs it (run `muse embed`)")
    stream, prepare = _stream(layout, model, feature_config, table_dtype, split.test, batch_size)
    return evaluate_model(model, stream, item_popularity(split, Vocab.load(layout.vocab("item_id"))),
                          num_workers=num_workers, progress=progress, prepare=prepare)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with `count` torch intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)
