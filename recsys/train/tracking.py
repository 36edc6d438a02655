"""MLflow tracking of training runs: params, loss curve, evaluation metrics, plots and the model.

Where runs go: `--tracking-uri` if given, else the MLFLOW_TRACKING_URI environment variable, else
a sqlite database in the data folder (`runs/mlflow.db`, artifacts in `runs/artifacts/`). Browse
the default store with

    mlflow ui --backend-store-uri sqlite:///DATA/runs/mlflow.db

The model is logged as an MLflow pyfunc in "models from code" form: the artifacts are the model
directory written by `recsys.models.io.save_model` (config.json + a torch state dict + the
feature config), and the python model is the source file `recsys/train/mlflow_model.py`, so
loading it never unpickles an object (weights load with `torch.load(weights_only=True)`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import yaml
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from recsys.paths import DataLayout
from recsys.train.metrics import BucketGAUC, EvalReport

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("mlflow_model.py")
# Pinned to the measured set (requirements.txt): inferring them spawns a slow subprocess.
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "item_id"), ColSpec("long", "ts")]),
    outputs=Schema([ColSpec("float", "probability")]),
    params=ParamSchema([ParamSpec("data_dir", "string", "")]),
)
MODEL_PIP_REQUIREMENTS = ["torch==2.13.0", "numpy==2.4.6", "pyarrow==25.0.1", "pandas==3.1.1", "mlflow==3.17.2"]


def resolve_tracking_uri(layout: DataLayout | None, override: str | None = None) -> str:
    """The tracking URI to use (see the module docstring for the order of precedence)."""
    if override:
        return override
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if layout is None:
        raise ValueError("no tracking URI: give a data folder, --tracking-uri or MLFLOW_TRACKING_URI")
    layout.runs_dir.mkdir(parents=True, exist_ok=True)
    return layout.tracking_uri


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local sqlite store live next to the database (not in ./mlruns of the cwd)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///") :])
    return (db.parent / "artifacts").resolve().as_uri()


def experiment_id(name: str, tracking_uri: str) -> str:
    """Id of experiment `name`, created on first use."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri))


class RunLogger:
    """Logging calls of one active MLflow run (created by `start_run`)."""

    def __init__(self, run: mlflow.ActiveRun, tracking_uri: str):
        self.run_id = run.info.run_id
        self.tracking_uri = tracking_uri

    def params(self, values: dict) -> None:
        """Log flat params; nested mappings are flattened to dotted names."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict) and value:
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), inner)
            else:
                flat[prefix] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)

        walk("", values)
        mlflow.log_params(flat)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def json_artifact(self, obj, name: str) -> None:
        mlflow.log_dict(obj, name)

    def evaluation(self, report: EvalReport, prefix: str = "test") -> None:
        """Scalars as `<prefix>_<name>` metrics, the full report as JSON, bucket plots as PNG."""
        self.metrics({f"{prefix}_{k}": v for k, v in report.scalars().items()})
        self.json_artifact(report.to_dict(), f"eval/{prefix}_report.json")
        for title, buckets, file_name in (
            ("GAUC by history length", report.by_history_length, "gauc_by_history_length.png"),
            ("GAUC by target popularity (training impressions)", report.by_popularity, "gauc_by_popularity.png"),
        ):
            mlflow.log_figure(bucket_figure(title, buckets), f"eval/{prefix}_{file_name}")

    def model(self, model_dir: Path, settings: dict, name: str = "model") -> str:
        """Log a saved model directory as a pyfunc (models from code); returns its models:/ URI.

        settings: the pyfunc's model_config (data_dir, embedding_dtype; see mlflow_model.py).
        """
        with warnings.catch_warnings():
            # The input example MLflow asks for would need a data folder to run against.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(PYFUNC_FILE),
                artifacts={"model_dir": str(model_dir)},
                model_config=settings,
                signature=MODEL_SIGNATURE,
                pip_requirements=MODEL_PIP_REQUIREMENTS,
            )
        return info.model_uri


def bucket_figure(title: str, buckets: list[BucketGAUC]):
    """Bar chart of GAUC per bucket, annotated with the number of impressions."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = [b for b in buckets if b.impressions]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = [b.gauc if b.users else 0.0 for b in shown]
    bars = ax.bar(range(len(shown)), values, color="#4c72b0", tick_label=[b.bucket for b in shown])
    for bar, bucket in zip(bars, shown):
        ax.annotate(f"n={bucket.impressions}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_title(title)
    ax.set_ylabel("GAUC")
    low = min((v for v in values if v > 0), default=0.5)
    ax.set_ylim(max(0.0, min(0.5, low) - 0.05), 1.0)
    fig.tight_layout()
    plt.close(fig)
    return fig


@contextmanager
def start_run(
    tracking_uri: str, experiment: str, run_name: str | None = None, tags: dict | None = None, run_id: str | None = None
) -> Iterator[RunLogger]:
    """Open an MLflow run in `experiment` (or reopen `run_id` on resume); FAILED if the body raises."""
    mlflow.set_tracking_uri(tracking_uri)
    exp_id = experiment_id(experiment, tracking_uri)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=None if run_id else run_name,
                          tags=tags) as run:
        log.info("MLflow run %s in experiment %r (%s)", run.info.run_id, experiment, tracking_uri)
        yield RunLogger(run, tracking_uri)


def download_model_dir(model_uri: str, tracking_uri: str, dst: Path | None = None) -> Path:
    """Fetch a logged model's artifacts and return the saved model directory inside them."""
    mlflow.set_tracking_uri(tracking_uri)
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst) if dst else tempfile.mkdtemp(prefix="muse-model-")))
    mlmodel = root / "MLmodel"
    if not mlmodel.exists():
        raise FileNotFoundError(f"{model_uri}: no MLmodel file in the downloaded artifacts ({root})")
    flavor = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get("model_dir")
    if not entry or not (root / entry["path"]).is_dir():
        raise FileNotFoundError(f"{model_uri}: the logged model has no 'model_dir' artifact (was it logged by muse train?)")
    return root / entry["path"]
