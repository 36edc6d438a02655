"""`muse train` and `muse evaluate` from the command line (untracked, a few steps)."""
from __future__ import annotations

import json

from recsys.cli import main


def test_train_then_evaluate_the_model_folder(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "exp.json"
    config.write_text(json.dumps({"model": "sim-hard", "history_len": 30, "short_len": 5, "top_k": 5,
                                  "embedding_dim": 8, "model_options": {"tower_hidden": [16]}}))
    code = main(["train", "--data", str(tiny_data.root), "--config", str(config), "--model", "din", "--max-steps", "3",
                 "--batch-size", "128", "--workers", "0", "--out", str(out), "--no-track", "--json"])
    assert code == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["metrics"]["train_steps"] == 3
    assert trained["run_id"] is None and trained["version"] is None
    assert json.loads((out / "model" / "config.json").read_text())["model"]["variant"] == "din"  # the flag wins

    code = main(["evaluate", "--data", str(tiny_data.root), "--model-uri", str(out / "model"), "--workers", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "GAUC by history length" in printed
    assert f"{trained['metrics']['gauc']:.4f}" in printed


def test_user_errors_exit_with_code_2(tiny_data, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_data.root), "--model", "gpt", "--no-track"]) == 2
    assert main(["evaluate", "--data", str(tiny_data.root), "--model-uri", str(tmp_path / "nothing")]) == 2
