"""Serving from the MLflow registry: `models:/muse@champion` is loaded, and followed when it moves."""
from __future__ import annotations

import threading

from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from recsys.serving.app import ServeSettings
from recsys.serving.service import is_alias_uri, serving_app
from recsys.train.registry import register_model
from recsys.train.tracking import start_run


def test_alias_uri_detection():
    assert is_alias_uri("models:/muse@champion")
    assert not is_alias_uri("models:/muse/3")
    assert not is_alias_uri("/models/muse@champion")


def test_service_follows_the_champion_alias(data_folder, model_dirs, tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = data_folder["layout"].root
    versions = []
    for model_dir in model_dirs:
        with start_run(tracking, "serving-test") as run:
            uri = run.model(model_dir, {"data_dir": str(root), "embedding_dtype": "float16"})
        versions.append(register_model(uri, "muse", tracking).version)
    client = MlflowClient(tracking)
    client.set_registered_model_alias("muse", "champion", versions[0])

    app = serving_app("models:/muse@champion", root, ServeSettings(), tracking_uri=tracking, poll_interval_s=0.1)
    request = {"user_id": int(data_folder["users"][2]), "candidates": data_folder["items"][:20].tolist()}
    with TestClient(app) as http:
        assert http.post("/rank", json=request).json()["model_version"] == str(versions[0])
        client.set_registered_model_alias("muse", "champion", versions[1])
        for _ in range(200):
            if http.get("/readyz").json()["model_version"] == str(versions[1]):
                break
            threading.Event().wait(0.05)
        response = http.post("/rank", json=request)
        assert response.status_code == 200
        assert response.json()["model_version"] == str(versions[1])
        assert f'muse_model_version{{version="{versions[1]}"}} 1.0' in http.get("/metrics").text
