"""`muse pipeline` usage and config errors exit with 2 and name what is wrong."""
from __future__ import annotations

import pytest
import yaml

from pipelines.config import PipelineConfig
from pipelines.errors import EXIT_USAGE, ConfigError
from recsys.cli import main as muse


def test_bad_dates_and_missing_config_exit_2(tmp_path, caplog):
    ws = str(tmp_path / "ws")
    assert muse(["pipeline", "run", "--workspace", ws, "--date", "2026-13-01"]) == EXIT_USAGE
    assert "2026-13-01" in caplog.text
    assert muse(["pipeline", "backfill", "--workspace", ws, "--start", "2026-01-05", "--end", "2026-01-01"]) == EXIT_USAGE
    assert muse(["pipeline", "run", "--workspace", ws, "--date", "2026-01-01"]) == EXIT_USAGE
    assert "pipeline.yaml" in caplog.text


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"data_root": "data", "gauc_margn": 0.1}))
    with pytest.raises(ConfigError, match="gauc_margn"):
        PipelineConfig.from_file(path)
    path.write_text(yaml.safe_dump({"data_root": "data", "daily_inputs": "{data_root}/daily"}))
    with pytest.raises(ConfigError, match="date"):
        PipelineConfig.from_file(path)
    path.write_text(yaml.safe_dump({"data_root": "data"}))
    assert PipelineConfig.from_file(path).data_root == str(tmp_path / "data")  # relative to the config file


def test_unknown_forced_stage_exits_2(tmp_path, caplog):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "pipeline.yaml").write_text(yaml.safe_dump({"data_root": str(tmp_path)}))
    assert muse(["pipeline", "run", "-w", str(ws), "--date", "2026-01-01", "--force", "trian"]) == EXIT_USAGE
    assert "trian" in caplog.text
