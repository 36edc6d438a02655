"""The MLflow model registry: register trained models, move the `champion` alias, load a version.

A registered version is a pyfunc logged by `RunLogger.model` (see tracking.py). The alias
`champion` names the version that serves; `promote_if_better` moves it only when a candidate's
evaluation metric (logged on its run as `test_<metric>`) beats the champion's by more than a margin.
`load_registered("models:/NAME@champion")` returns the model ready to score, loaded without
unpickling anything.
"""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from recsys.cli import UserError
from recsys.train.tracking import download_model_dir

log = logging.getLogger(__name__)

CHAMPION = "champion"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def register_model(model_uri: str, name: str, tracking_uri: str, tags: dict[str, str] | None = None) -> ModelVersion:
    """Register a logged model (`models:/m-...` or `runs:/...`) as a new version of `name`."""
    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(model_uri, name, tags=tags)
    log.info("registered %s as version %s of %r", model_uri, version.version, name)
    return version


def _run_metric(client: MlflowClient, version: ModelVersion, metric: str) -> float:
    run = client.get_run(version.run_id)
    key = f"test_{metric}"
    if key not in run.data.metrics:
        raise UserError(f"model {version.name!r} version {version.version}: its run {version.run_id} has no metric {key!r}")
    return float(run.data.metrics[key])


def champion_version(name: str, tracking_uri: str, alias: str = CHAMPION) -> ModelVersion | None:
    """The version `alias` points to, or None when the alias (or the model) does not exist."""
    client = MlflowClient(tracking_uri)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote_if_better(
    name: str,
    version: str | int,
    metric: str = "gauc",
    margin: float = 0.0,
    tracking_uri: str | None = None,
    alias: str = CHAMPION,
) -> bool:
    """Point `alias` at `version` if its `metric` beats the current holder's by more than `margin`.

    Higher is better (GAUC, AUC). With no current champion the version is promoted. Returns whether
    the alias moved. Both values are recorded as version tags, so the registry UI shows why.
    """
    client = MlflowClient(tracking_uri)
    candidate = client.get_model_version(name, str(version))
    value = _run_metric(client, candidate, metric)
    client.set_model_version_tag(name, candidate.version, metric, f"{value:.6f}")
    current = champion_version(name, client.tracking_uri, alias)
    if current is not None and current.version == candidate.version:
        return True
    if current is not None:
        best = _run_metric(client, current, metric)
        if not value > best + margin:
            log.info("%s v%s: %s %.5f does not beat %s v%s (%.5f) by more than %g: %s stays",
                     name, candidate.version, metric, value, alias, current.version, best, margin, alias)
            return False
        log.info("%s v%s: %s %.5f beats v%s (%.5f) by more than %g: new %s",
                 name, candidate.version, metric, value, current.version, best, margin, alias)
    else:
        log.info("%s v%s: no %s yet: promoting it (%s %.5f)", name, candidate.version, alias, metric, value)
    client.set_registered_model_alias(name, alias, candidate.version)
    return True


def resolve_model_uri(model_uri: str, tracking_uri: str) -> ModelVersion:
    """The registry version named by `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    match = _MODEL_URI.match(model_uri)
    if not match:
        raise UserError(f"{model_uri!r}: expected a registry URI like models:/NAME@champion or models:/NAME/3")
    client = MlflowClient(tracking_uri)
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(match["name"], match["alias"])
        return client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        raise UserError(f"{model_uri}: not found in the registry at {tracking_uri} ({exc.message})") from None


def load_registered(model_uri: str, tracking_uri: str | None = None, map_location: str = "cpu"):
    """Load a registered model version for scoring.

    Args:
        model_uri: "models:/NAME@ALIAS" or "models:/NAME/VERSION".
        tracking_uri: the registry's tracking URI (default: MLFLOW_TRACKING_URI / mlflow's default).
    Returns:
        (MuseModel in eval mode, FeatureConfig it was trained with, info) where info holds
        name, version, run_id, aliases and source.
    """
    from recsys.models.io import load_feature_config, load_model_dir

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    version = resolve_model_uri(model_uri, tracking_uri)
    # The weights are read fully into memory, so the downloaded copy is removed at once: a service
    # that hot-reloads every new champion must not leave a model folder behind per reload.
    with tempfile.TemporaryDirectory(prefix="muse-model-") as download_dir:
        model_dir = download_model_dir(f"models:/{version.name}/{version.version}", tracking_uri, Path(download_dir))
        try:
            model = load_model_dir(model_dir, map_location=map_location)
            feature_config = load_feature_config(model_dir)
        except (RuntimeError, ValueError, FileNotFoundError) as exc:
            raise UserError(f"{model_uri}: version {version.version} does not load with this code: {exc}") from None
    if feature_config is None:
        raise UserError(f"{model_uri}: version {version.version} was saved without its feature config")
    info = {
        "name": version.name,
        "version": str(version.version),
        "run_id": version.run_id,
        "aliases": list(version.aliases or []),
        "source": version.source,
    }
    return model, feature_config, info
