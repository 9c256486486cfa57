"""benchmarks/gpu_check.sh: prepared for a GPU machine, harmless without one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


def test_gpu_check_without_cuda_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check (minutes), not this no-GPU path")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=300, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cuda"] is False and "no CUDA" in out["message"]


def test_gpu_check_model_is_about_one_billion_parameters():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    from elastic_megatron.config import load_config
    from elastic_megatron.model.hybrid import count_parameters

    cfg = load_config(None, gpu_check.ONE_B)  # a valid config (validated like any other)
    assert 0.8e9 <= count_parameters(cfg.model, gpu_check.VOCAB) <= 1.3e9
    assert cfg.train.recompute == "full" and cfg.train.precision == "bf16"
