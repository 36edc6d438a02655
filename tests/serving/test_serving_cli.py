"""`muse serve`: flags reach the app, and user mistakes exit with 2 and a message."""
from __future__ import annotations

import uvicorn
from fastapi.testclient import TestClient

from recsys.cli import main


def test_serve_builds_the_app_from_flags_and_runs_uvicorn(monkeypatch, data_folder, model_dirs):
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: captured.update(app=app, **kwargs))
    code = main(["serve", "--data", str(data_folder["layout"].root), "--model-uri", str(model_dirs[0]),
                 "--port", "8123", "--max-candidates", "5", "--max-concurrency", "3", "--poll-s", "0"])
    assert code == 0
    assert (captured["host"], captured["port"]) == ("127.0.0.1", 8123)
    items = data_folder["items"][:6].tolist()
    with TestClient(captured["app"]) as client:
        assert client.post("/rank", json={"user_id": 1, "candidates": items}).status_code == 422
        body = client.post("/rank", json={"user_id": 1, "candidates": items[:5]}).json()
    assert body["model_version"] == "model-a" and len(body["items"]) == 5


def test_serve_reports_user_mistakes(tmp_path, data_folder, caplog):
    root = str(data_folder["layout"].root)
    assert main(["serve", "--data", str(tmp_path / "missing"), "--model-uri", "x"]) == 2
    assert main(["serve", "--data", root, "--model-uri", str(tmp_path)]) == 2
    assert "not a saved model folder" in caplog.text
    assert main(["serve", "--data", root, "--model-uri", str(tmp_path), "--max-concurrency", "0"]) == 2
    assert "max_concurrency must be >= 1" in caplog.text
