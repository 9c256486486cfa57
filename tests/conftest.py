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


def stderr_lines(err: str) -> list[str]:
    """A command's stderr lines apart from the backend ladder's announcement, which must come at most once."""
    from elastic_megatron.compat.backends import ANNOUNCE

    lines = err.strip().splitlines()
    assert sum(line.startswith(ANNOUNCE) for line in lines) <= 1, f"backend announced more than once:\n{err[-3000:]}"
    return [line for line in lines if not line.startswith(ANNOUNCE)]


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`elastic-megatron ARGS` under torchrun with nproc ranks (gloo on CPU); raises on failure.

    One rank without extra env runs in this process instead (the console script's main(), with one
    intra-op thread as torchrun's OMP_NUM_THREADS=1 gives a worker): the same numbers, without the
    ~8 s of starting torchrun and a worker and importing megatron again."""
    if nproc == 1 and env is None:
        return _run_cli_in_process(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "elastic_megatron.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _run_cli_in_process(args: list[str]) -> subprocess.CompletedProcess:
    import contextlib
    import io

    import torch

    from elastic_megatron.cli import main

    out, err, threads, cwd = io.StringIO(), io.StringIO(), torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    os.chdir(REPO)  # relative paths mean what they mean to the subprocess (cwd=REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    if rc != 0:
        raise AssertionError(f"elastic-megatron {' '.join(args)} failed ({rc}):\n{out.getvalue()[-3000:]}\n"
                             f"{err.getvalue()[-6000:]}")
    return subprocess.CompletedProcess(["elastic-megatron", *args], rc, out.getvalue(), err.getvalue())


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
