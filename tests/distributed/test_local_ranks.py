"""A training run on local gloo ranks (local_ranks.run_on_local_ranks, how the demo trains its
parent on a CPU box): the same run as in one process bit for bit; a signal stops it at a checkpoint,
as it stops the job in one process; a failing rank is one error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, read_metrics

pytestmark = pytest.mark.distributed

TINY = [*FAST, "data.seq_length=64", "train.warmup_steps=2"]


def test_two_ranks_train_the_same_run_as_one_process(tmp_path):
    """Two micro-batches per step: one process accumulates both, two ranks run one each and the
    all-reduce adds them. Plain (unsliced) layers, so the sum is the same a + b: every loss equal."""
    import torch

    from elastic_megatron.config import load_config
    from elastic_megatron.local_ranks import run_on_local_ranks
    from elastic_megatron.train.loop import train

    def cfg(name):
        return load_config(None, [*TINY, "train.steps=3", f"logging.out_dir={tmp_path / name}"])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = train(cfg("here"))
    finally:
        torch.set_num_threads(threads)
    run_on_local_ranks("train", cfg("ranks"), ranks=2, threads=1)
    assert read_metrics(tmp_path / "ranks") == here.losses and len(here.losses) == 3
    assert (tmp_path / "ranks" / "checkpoints" / "latest").read_text().strip() == "iter_0000003"


SCRIPT = """
import sys
from elastic_megatron.config import load_config
from elastic_megatron.local_ranks import run_on_local_ranks
from elastic_megatron.train.preemption import Preempted
try:
    run_on_local_ranks("train", load_config(None, sys.argv[1:]), ranks=2, threads=1)
except Preempted as exc:
    print("preempted", exc.signum, exc.step, exc.checkpoint, flush=True)
    sys.exit(128 + exc.signum)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print("finished", flush=True)
"""


@pytest.mark.parametrize("sig, code, times", [(signal.SIGUSR1, 138, 1), (signal.SIGINT, 130, 1), (signal.SIGINT, 130, 2)])
def test_a_signal_stops_the_ranks_at_a_checkpoint(tmp_path, sig, code, times):
    """SLURM's warning signal (`--signal=USR1@T`, which torchrun does not handle: it reaches torchrun
    as SIGTERM, as SLURM's SIGTERM does) or a terminal's Ctrl-C (sent to the foreground group, as a
    terminal does): the ranks save the step they finish, and the caller learns it was stopped.
    Ctrl-C twice: torchrun and the ranks end at once, none left running."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # twice: steps of ~1 s (512 tokens), so that "at once" (no checkpoint) differs from "at the next step"
    seq = ["data.seq_length=512"] if times == 2 else []
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *TINY, *seq, "train.steps=500", f"logging.out_dir={out}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    for _ in range(times):
        os.killpg(proc.pid, sig)  # the caller's group: torchrun and its ranks run in sessions of their own
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stdout + stderr[-4000:]
    assert _ranks_gone(), "ranks left running"
    if times == 2:
        assert stdout.strip() == "interrupted" and not (out / "checkpoints" / "latest").exists()
        return
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[-1])
    assert 2 <= step < 500  # saved at a step boundary after the signal, long before the end
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()][-1] == step
    if sig == signal.SIGINT:
        assert stdout.strip() == "interrupted"
    else:
        assert stdout.strip() == f"preempted {int(sig)} {step} {out / 'checkpoints' / latest}"


def _ranks_gone(wait_s: float = 10.0) -> bool:
    """No process left whose command line names a ranks run's config directory (killed ones may take
    a moment to go). Read from /proc: CI's image need not have procps."""
    def running() -> bool:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if b"elastic_megatron_ranks_" in cmdline.read_bytes():
                    return True
            except OSError:
                pass
        return False

    deadline = time.time() + wait_s
    while running():
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_failing_rank_is_one_error(tmp_path):
    from elastic_megatron.config import ConfigError, load_config
    from elastic_megatron.local_ranks import run_on_local_ranks

    cfg = load_config(None, [*TINY, "train.steps=2", f"logging.out_dir={tmp_path / 'run'}",
                             f"checkpoint.load={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match=r"^`elastic-megatron train` on 2 local ranks failed with exit status 1 "
                                          r"\(its error is above\)$"):
        run_on_local_ranks("train", cfg, ranks=2, threads=1)
