"""Importance and sorting are layout-independent: TP=2, PP=2 and DP=2 against one TP=1 process (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed


def torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "distributed" / "_sort_worker.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sorting")
    torchrun(1, str(out), "ref")
    torchrun(2, str(out), "tp2", "pp2", "dp2")
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_importance_and_sorting_match_tp1(results, layout):
    r = results[layout]
    assert r["score_rel_err"] <= 1e-5, r  # every width score and the single-removal nmse
    assert r["order_equal"] == 1.0, r  # the iterative depth ranking
    assert r["logits_vs_ref"] <= 1e-5, r  # the unsorted parent is the same function
    assert r["sorted_vs_unsorted"] <= 1e-5, r  # sorting keeps the function under this layout
    assert r["weights_max_diff"] == 0.0, r  # the TP=1 sort's weights, FFN dealt out to the TP shards
    assert r["stage_params"] == r["ref_params"], r  # every parameter was compared (both PP stages)
    assert r["ffn_ranked_globally"] == 1.0, r
