"""Training on a CPU box's cores as local gloo ranks (data parallel) instead of one process's threads.

Why: on a CPU, one process with N intra-op threads leaves cores idle. Every op below torch's grain
size (~32k elements: norms, gates, the scan's small pieces) runs on one thread while the others wait,
and the optimizer step and the Python between ops are serial. N processes with one thread each keep
every core busy; megatron's DDP sums their micro-batches' gradients over gloo. On the idle 2-core box
the demo's parent steps took 0.97x (short phase) and 0.90x (long phase) as long on 2 ranks as on 2
threads (benchmarks/cpu_threads.py, docs/performance.md), with the same losses bit for bit: each
rank runs one of the step's two micro-batches, and the all-reduce adds their gradients (a + b) as
the one process accumulates them. Sliced (elastic) layers accumulate their weight gradient inside
the GEMM (addmm), so an elastic run on ranks is equal only to rounding; the demo keeps those in one
process.

`local_ranks` decides how many; `run_on_local_ranks` runs a CLI job on them through torchrun, as a
user would (`torchrun --standalone --nproc_per_node=2 -m elastic_megatron.cli train ...`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .config import RunConfig, to_yaml


def local_ranks(cfg: RunConfig, cores: int) -> int:
    """How many local ranks a training run of `cfg` uses on `cores` CPU cores: one per core, up to
    the micro-batches of a step, and a count that divides them (every rank gets the same whole
    micro-batches, so the step is the same one). 1 on a GPU machine (one device: the process owns it)
    and for a run that asks for its own layout (model parallelism or an explicit data-parallel size)."""
    p, t = cfg.parallel, cfg.train
    if torch.cuda.is_available() or p.tensor * p.pipeline * p.context * p.expert > 1 or p.data:
        return 1
    micro = t.global_batch_size // t.micro_batch_size
    return max(r for r in range(1, max(1, min(cores, micro)) + 1) if micro % r == 0)


def run_on_local_ranks(command: str, cfg: RunConfig, ranks: int, threads: int) -> None:
    """`elastic-megatron COMMAND --config <cfg as YAML>` on `ranks` local processes of `threads`
    OpenMP threads each (torchrun --standalone: a free port, this machine only); their output is
    ours. Stopping it loses nothing, as for the job run in this process: SIGTERM / SIGUSR1 / Ctrl-C
    here become one SIGTERM for torchrun, which passes it to every rank; the ranks checkpoint the
    step they finish and stop, and this raises `Preempted` (KeyboardInterrupt for Ctrl-C). A second
    Ctrl-C kills torchrun and the ranks at once (complete checkpoints stay). torchrun runs in a
    session of its own, out of the terminal's foreground group, so that only this process decides
    what it gets: SIGUSR1 (SLURM's `--signal=USR1@T`) would end torchrun, which does not handle it,
    and leave the ranks running in the sessions torchrun starts them in. A rank that fails raises
    ConfigError with torchrun's exit status (the rank's error is printed above it)."""
    from .config import ConfigError
    from .train.checkpoint import latest_checkpoint, loop_state
    from .train.preemption import SIGNALS, Preempted

    got: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum, frame):
        got.append(signum)
        if proc is None:
            return  # not started yet: it gets the SIGTERM as soon as it is
        if got[:2] == [signal.SIGINT, signal.SIGINT]:
            _kill_now(proc)
        elif len(got) == 1:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        with tempfile.TemporaryDirectory(prefix="elastic_megatron_ranks_") as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(to_yaml(cfg))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "elastic_megatron.cli", command, "--config", str(path)]
            proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                    start_new_session=True)
            if got:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if got:
        if got[0] == signal.SIGINT:
            raise KeyboardInterrupt
        ckpt = latest_checkpoint(Path(cfg.checkpoint.dir or Path(cfg.logging.out_dir) / "checkpoints"))
        raise Preempted(got[0], int(loop_state(ckpt).get("step", 0)) if ckpt else 0, str(ckpt or "none"))
    if code:
        raise ConfigError(f"`elastic-megatron {command}` on {ranks} local ranks failed with exit status {code} "
                          "(its error is above)")


def _kill_now(proc: subprocess.Popen) -> None:
    """SIGKILL to torchrun and its ranks (its children, each in a session of its own)."""
    for pid in [*_children(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid`: from /proc on Linux (no procps needed), else `pgrep -P`."""
    if Path("/proc/self/stat").exists():
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                pass  # ended meanwhile
        return found
    try:
        return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    except OSError:
        return []
