"""benchmarks/gpu_check.sh: prepared for a bare GPU machine, harmless without one, its parts run here small."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


def _gpu_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_gpu_check_without_cuda_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check (minutes), not this no-GPU path")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=300, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cuda"] is False and "no CUDA" in out["message"]


def test_gpu_check_model_is_about_one_billion_parameters():
    gpu_check = _gpu_check()
    from elastic_megatron.config import load_config
    from elastic_megatron.model.hybrid import count_parameters

    cfg = load_config(None, gpu_check.ONE_B)  # a valid config (validated like any other)
    assert 0.8e9 <= count_parameters(cfg.model, gpu_check.VOCAB) <= 1.3e9
    assert cfg.train.recompute == "full" and cfg.train.precision == "bf16" and cfg.model.backend == "auto"
    assert sum(gpu_check.LIMITS_S.values()) <= 8 * 60  # the whole check fits the 8-minute budget


def test_env_part_reports_the_ladder():
    res = _gpu_check().part_env()
    assert res["versions"]["megatron-core"] == "0.16.1"
    if not torch.cuda.is_available():
        assert res["auto"].startswith("backend torch") and "no CUDA device" in res["ladder"]["te"]


def test_tiny_pipeline_part_runs_end_to_end_here_in_fp32(monkeypatch):
    """The same commands the GPU runs (train -> importance -> elastic-train -> slice -> generate), small."""
    gc = _gpu_check()
    monkeypatch.setitem(gc.LIMITS_S, "tiny_pipeline", 400)
    res = gc.part_tiny_pipeline(["train.precision=fp32", "data.seq_length=32", "train.micro_batch_size=2",
                                 "train.global_batch_size=2"], steps=2)
    assert res["ok"], res
    assert res["backend"].startswith("backend torch (") and len(res["elastic_losses"]) == 4
    assert len(res["sliced"]) == 3 and res["generated"].startswith("12+7=")


def test_a_failing_or_hanging_part_is_recorded_as_such(monkeypatch, capsys):
    gc = _gpu_check()
    gc.main(["--part", "no_such_part"])  # what a part that raises prints: one JSON line, ok false
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ok"] is False and "KeyError" in out["error"]
    monkeypatch.setitem(gc.LIMITS_S, "env", 0.05)  # far too short: the child is killed, the parent goes on
    out = gc._run_part("env")
    assert out["ok"] is False and out["error"] == "timed out"
