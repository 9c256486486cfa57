"""Invariant 4: stopping at step 5 and resuming continues exactly the run that never stopped."""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from elastic_megatron.config import load_config
from elastic_megatron.train.checkpoint import latest_checkpoint
from elastic_megatron.train.loop import train
from tests.conftest import FAST, read_metrics


def _tensors(ckpt_dir, tmp_path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint (model and optimizer state), flattened by key."""
    out = tmp_path / f"{ckpt_dir.parent.parent.name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    walk("", torch.load(out, weights_only=False))
    return flat


def _cfg(out, *extra):
    return load_config(None, ["train.steps=10", "train.warmup_steps=3", *FAST, f"logging.out_dir={out}", *extra])


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(29600 + os.getpid() % 300))


def test_resume_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    full = train(_cfg(straight)).losses
    first = train(_cfg(split, "train.exit_at_step=5")).losses
    assert len(first) == 5 and latest_checkpoint(split / "checkpoints").name == "iter_0000005"
    second = train(_cfg(split)).losses  # resumes from iter_0000005
    assert len(second) == 5
    assert first + second == full, f"{first + second} != {full}"
    assert read_metrics(split) == full  # the metrics file continues the same run too

    a = _tensors(latest_checkpoint(straight / "checkpoints"), tmp_path)
    b = _tensors(latest_checkpoint(split / "checkpoints"), tmp_path)
    assert a.keys() == b.keys() and any("exp_avg" in k for k in a), sorted(a)[:5]
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def test_resume_with_no_checkpoint_starts_fresh_and_bad_load_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dist_checkpointing checkpoint"):
        train(_cfg(tmp_path / "x", "train.steps=1", f"checkpoint.load={tmp_path}"))


def signal_after(metrics, records: int, signum: int) -> None:
    """Send `signum` to this process once `metrics` holds `records` lines (a real signal, as SLURM's)."""
    import signal  # noqa: F401
    import threading
    import time

    def run():
        deadline = time.time() + 300
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= records:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.005)

    threading.Thread(target=run, daemon=True).start()


def test_sigterm_checkpoints_the_step_and_the_rerun_loses_nothing(tmp_path):
    """Preemption: SIGTERM mid-run -> checkpoint of the step just finished, Preempted (exit 143 from the
    CLI); the same command again resumes there, and the whole is the uninterrupted run, bit for bit."""
    import signal

    from elastic_megatron.train.preemption import Preempted

    straight, split = tmp_path / "straight", tmp_path / "split"
    full = train(_cfg(straight, "train.steps=12")).losses
    signal_after(split / "metrics.jsonl", 3, signal.SIGTERM)
    with pytest.raises(Preempted) as info:
        train(_cfg(split, "train.steps=12"))
    k = info.value.step
    assert info.value.signum == signal.SIGTERM and 3 <= k < 12
    assert latest_checkpoint(split / "checkpoints").name == f"iter_{k:07d}"  # the last finished step: 0 lost
    assert len(read_metrics(split)) == k
    (split / "checkpoints" / "iter_0000011.tmp").mkdir()  # a save a crash interrupted: removed, never loaded
    (split / "checkpoints" / "iter_0000011.tmp" / "junk.distcp").write_bytes(b"\0" * 10)
    rest = train(_cfg(split, "train.steps=12")).losses
    assert not (split / "checkpoints" / "iter_0000011.tmp").exists()
    assert len(rest) == 12 - k and read_metrics(split) == full
    a = _tensors(latest_checkpoint(straight / "checkpoints"), tmp_path)
    b = _tensors(latest_checkpoint(split / "checkpoints"), tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
