"""Invariant 1 (Megatron form): parent under a subnet == sliced standalone model, at TP=1 and TP=2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("tp", [1, 2])
def test_parent_under_subnet_equals_sliced_model(tmp_path, tp):
    out = tmp_path / "slice.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
           str(REPO / "tests/distributed/_slice_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    data = json.loads(out.read_text())
    assert data["tp"] == tp and len(data["results"]) == 3
    for r in data["results"]:
        assert r["max_abs_diff"] <= 1e-5, r
        assert r["grad_max_abs_diff"] <= 1e-6 and r["grad_max_abs"] > 1e-4, r  # same gradients as the slice
        assert r["max_abs_logit"] > 0.1  # a real comparison, not of zeros
        assert r["params_closed_form"] == r["params_sliced_config"]
        assert not all(r["subnet"]["keep"])  # dropped layers in every budget
    assert any(len(set(r["subnet"]["ffn"])) > 1 for r in data["results"])  # heterogeneous FFN widths
    sizes = [r["params_closed_form"] for r in data["results"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 4
