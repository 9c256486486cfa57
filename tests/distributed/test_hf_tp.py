"""Hugging Face import and export under TP=2 (each rank holds its shard only): logits equal transformers',
the export gives the original tensors back, and the imported checkpoint loads exactly at PP=2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.distributed
pytest.importorskip("transformers")


def test_import_and_export_at_tp2(tmp_path):
    from tests.unit.test_hf import hf_tensors, make_hf_parent

    ref = make_hf_parent(tmp_path / "src")
    torch.save(ref, tmp_path / "src" / "ref.pt")
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests/distributed/_hf_worker.py"), str(tmp_path / "src"), str(tmp_path / "run"),
           str(tmp_path / "exp"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert r["tp"] == 2 and r["max_abs_diff"] <= 1e-4, r
    assert r["pp2_max_abs_diff"] == 0.0, r  # the same checkpoint loads exactly at PP=2
    src = hf_tensors(tmp_path / "src")
    assert r["shard_numel"] < 0.6 * sum(t.numel() for t in src.values())  # a rank holds about half
    back = hf_tensors(tmp_path / "exp" / "budget_1p0")
    assert set(back) == set(src) and all(torch.equal(src[k], back[k]) for k in src)
