"""The tiny pipeline under a real SLURM: slurmctld + slurmd + munged on this machine, `sbatch` for
every job, a preemption mid-`train`, requeue, resume, and the chained jobs' outputs.

The fixture starts the daemons with tests/slurm/slurm_up.sh, which installs Debian's packages when
they are missing (the README's test command thus needs nothing set up by hand). The test is skipped,
with the reason, only where SLURM cannot start (not root, no apt-get, the packages cannot be had).

What happens, as on a cluster: `slurm/pipeline.sh` submits train -> importance -> elastic-train ->
export-hf with afterok dependencies. Mid-train the test sends USR1 to the batch shell, as
`#SBATCH --signal=B:USR1@300` does before a time limit; with REQUEUE=1 the script runs
`scontrol requeue`, SLURM sends SIGTERM to the step, torchrun forwards it, the workers checkpoint the
finished step and exit 143; the job goes back to the queue, starts again, resumes from that
checkpoint and finishes, and only then do the dependents run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

HERE = Path(__file__).resolve().parent
PIPELINE = REPO / "slurm" / "pipeline.sh"
STEPS = 40
pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

CONFIG = f"""\
# the tiny model, short and quick: a 2-rank (DP 2) parent, a 2-step curriculum
data: {{seq_length: 32}}
train: {{steps: {STEPS}, micro_batch_size: 2, global_batch_size: 4, eval_interval: 0, warmup_steps: 2}}
checkpoint: {{save_interval: 1000}}  # no periodic saves: the resume below comes from the preemption save
logging: {{progress: false, wandb_mode: disabled}}
elastic: {{importance_batches: 2}}
curriculum:
  - {{name: short, steps: 2}}
"""


def _sh(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _controller_answers() -> bool:
    if not shutil.which("scontrol"):
        return False
    try:
        return "UP" in _sh("scontrol", "ping", timeout=10).stdout
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def slurm():
    """A real SLURM controller + node on localhost, up for this module (stopped after if we started it)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("real SLURM test: starting slurmctld/slurmd/munged here needs root on Linux")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("real SLURM test: no slurmctld and no apt-get to install Debian's slurm packages")
    was_up = _controller_answers()
    up = subprocess.run(["bash", str(HERE / "slurm_up.sh")], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        pytest.skip(f"real SLURM test: SLURM could not start here: {(up.stdout + up.stderr).strip()[-600:]}")
    yield
    if not was_up:
        subprocess.run(["bash", str(HERE / "slurm_down.sh")], capture_output=True, timeout=60)


def job_info(job: str) -> dict[str, str]:
    line = _sh("scontrol", "-o", "show", "job", job).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def wait_for(pred, what: str, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def loss_steps(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [r["step"] for r in map(json.loads, f.read_text().splitlines()) if "loss" in r]


ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def test_pipeline_preempted_requeued_resumed(slurm, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    run = tmp_path / "run"
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "TORCHRUN": str(Path(bindir) / "torchrun"), "REQUEUE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CONFIG", None)
    sub = subprocess.run(["bash", str(PIPELINE), "--out", str(run), "--config", str(cfg), "--gpus-per-node", "2",
                          "--budget", "0.5", "--sbatch-args", "--gpus-per-node=0 --cpus-per-task=2 --time=15"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    ids = dict(kv.split("=") for kv in (run / "pipeline.jobs").read_text().split())
    assert list(ids) == ["parent", "importance", "elastic", "export"]
    job_name = {"parent": "train", "importance": "importance", "elastic": "elastic", "export": "export"}
    log = lambda key: "\n".join(p.read_text() for p in (run / "logs").glob(f"em-{job_name[key]}-*.out"))  # noqa: E731
    try:
        # mid-train: the time-limit warning (B:USR1) -> REQUEUE=1 -> scontrol requeue -> SIGTERM
        wait_for(lambda: len(loss_steps(run / "parent")) >= 3, "3 logged train steps", 300)
        assert job_info(ids["parent"])["JobState"] == "RUNNING"
        sig = _sh("scancel", "--batch", "--signal=USR1", ids["parent"])
        assert sig.returncode == 0, sig.stderr
        # (slurm_up.sh sets cred_expire=10: SLURM holds a requeued job back that long, 120 s by default)
        wait_for(lambda: int(job_info(ids["parent"]).get("Restarts", "0")) >= 1, "the requeue", 120)
        for name in ("parent", "importance", "elastic", "export"):
            info = wait_for(lambda: (i := job_info(ids[name])) and i.get("JobState") not in ACTIVE and i,
                            f"the {name} job to end", 600, poll=0.5)
            assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (name, info, log(name)[-4000:])
    finally:
        for j in ids.values():
            _sh("scancel", j)
    train_log = log("parent")
    m = re.search(r"preempted by SIGTERM after step (\d+): checkpoint (\S+);", train_log)
    assert m, train_log[-4000:]
    k = int(m.group(1))
    assert 3 <= k < STEPS and Path(m.group(2).rstrip(";")).name == f"iter_{k:07d}"
    assert "time limit near (USR1)" in train_log and "requeueing job" in train_log
    assert f"resumed from {run / 'parent' / 'checkpoints' / f'iter_{k:07d}'} at step {k}" in train_log, train_log[-3000:]
    assert f"trained {STEPS} steps" in train_log
    # 0 steps lost, none done twice: every step logged exactly once, in order
    assert loss_steps(run / "parent") == list(range(1, STEPS + 1))
    # the chained jobs ran on the resumed parent and left their outputs
    assert (run / "importance" / "sorted" / "config.yaml").exists()
    assert loss_steps(run / "elastic") == [1, 2]
    hf = [p for p in (run / "hf").iterdir() if p.is_dir()]
    assert len(hf) == 1 and (hf[0] / "config.json").exists() and list(hf[0].glob("*.safetensors"))
