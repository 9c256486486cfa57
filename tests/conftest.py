"""Shared pytest setup: GPU tests skip without CUDA; helpers to run the CLI under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tiny and quick: every distributed / resume test uses these unless it says otherwise.
FAST = ["train.eval_interval=0", "logging.progress=false", "logging.wandb_mode=disabled"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`elastic-megatron ARGS` under torchrun with nproc ranks (gloo on CPU); raises on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "elastic_megatron.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(out_dir: Path, key: str = "loss") -> list[float]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


def make_sorted_parent(root: Path, parent: list[str]) -> list[str]:
    """A 2-step parent `train`, then `importance` (scores + the sorted parent with its config), as the
    README runs them; returns the args that point `elastic-train` / `slice` at the sorted parent."""
    run_cli(["train", *parent, "train.steps=2", f"logging.out_dir={root / 'parent'}"])
    run_cli(["importance", *parent, "elastic.importance_batches=2", f"checkpoint.load={root / 'parent'}",
             f"logging.out_dir={root / 'imp'}"])
    return ["--config", str(root / "imp" / "sorted" / "config.yaml"),
            f"checkpoint.load={root / 'imp' / 'sorted' / 'checkpoints'}"]
