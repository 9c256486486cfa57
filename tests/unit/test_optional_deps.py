"""wandb is optional (a bare GPU machine runs from carried wheels without it): offline runs keep
metrics.jsonl and say so in one line; online without wandb is a one-line config error."""

from __future__ import annotations

import json
import sys

import pytest

from elastic_megatron.config import ConfigError, load_config
from elastic_megatron.train.metrics import MetricsLogger


def _logger(tmp_path, mode):
    cfg = load_config(None, [f"logging.wandb_mode={mode}", "logging.progress=false", f"logging.out_dir={tmp_path}"])
    return MetricsLogger(cfg, enabled=True, total_steps=2)


def test_offline_without_wandb_writes_the_jsonl_and_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    log = _logger(tmp_path, "offline")
    log.log({"step": 1, "loss": 2.5})
    log.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wandb is not installed" in err[0] and "metrics.jsonl" in err[0]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5


def test_online_without_wandb_is_one_config_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with pytest.raises(ConfigError, match="logging.wandb_mode.*wandb is not installed.*offline or disabled"):
        _logger(tmp_path, "online")
