"""The router is replicated on every rank: same seed -> same draws, and all-reduced grads keep it identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed


def test_router_replicas_stay_identical_on_two_gloo_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "distributed" / "_router_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["world"] == 2
    assert r["init_params_equal"], r  # built from the same seed
    assert r["draws_equal"] and r["distinct_draws"] > 1, r  # 50 identical draws, and not all the same subnet
    assert r["grads_differed_before_reduce"], r  # each rank drew its own noise, so the test means something
    assert r["params_equal_after_training"] and r["inference_equal"], r  # bit-identical after 20 Adam steps
