"""The ranking app as a Ray Serve deployment on local Ray (2 CPUs), queried over HTTP on loopback."""
from __future__ import annotations

import socket

import httpx
import numpy as np
import pytest

from recsys.serving.app import ServeSettings
from recsys.serving.ranker import Ranker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_deployment_answers_like_the_in_process_ranker(data_folder, model_dirs):
    ray = pytest.importorskip("ray")
    from ray import serve

    from recsys.serving.ray_app import ranker_application, run_on_ray

    root = data_folder["layout"].root
    user, items = int(data_folder["users"][11]), data_folder["items"][:30].tolist()
    expected = Ranker.load(str(model_dirs[0]), root).score(user, items).probabilities
    port = _free_port()
    # Another test module may have left a Ray instance with other settings in this process.
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        app = ranker_application(str(model_dirs[0]), root, ServeSettings(max_candidates=50), replicas=1)
        run_on_ray(app, "127.0.0.1", port, blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            response = client.post("/rank", json={"user_id": user, "candidates": items})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model_version"] == "model-a"
            got = {item["item_id"]: item["score"] for item in body["items"]}
            np.testing.assert_allclose([got[i] for i in items], expected, atol=1e-5, rtol=0)
            too_many = client.post("/rank", json={"user_id": user, "candidates": list(range(51))})
            assert too_many.status_code == 422
            assert client.get("/readyz").json()["model_version"] == "model-a"
    finally:
        serve.shutdown()
        ray.shutdown()
