"""Training on a CPU box's cores as local gloo ranks (data parallel) instead of one process's threads.

Why: on a CPU, one process with N intra-op threads leaves cores idle. Every op below torch's grain
size (~32k elements: norms, gates, the scan's small pieces) runs on one thread while the others wait,
and the optimizer step and the Python between ops are serial. N processes with one thread each keep
every core busy; megatron's DDP sums their micro-batches' gradients over gloo. On the idle 2-core box
the demo's parent step took 0.84x as long on 2 ranks as on 2 threads (benchmarks/cpu_threads.py,
docs/performance.md), with the same losses bit for bit: each rank runs one of the step's two
micro-batches, and the all-reduce adds their gradients (a + b) as the one process accumulates them.
Sliced (elastic) layers accumulate their weight gradient inside the GEMM (addmm), so an elastic
run on ranks is equal only to rounding; the demo keeps those in one process.

`local_ranks` decides how many; `run_on_local_ranks` runs a CLI job on them through torchrun, as a
user would (`torchrun --standalone --nproc_per_node=2 -m elastic_megatron.cli train ...`).
"""

from __future__ import annotations

import os
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
    OpenMP threads each (torchrun --standalone: a free port, this machine only). Its output goes
    to ours. A rank that fails raises here with torchrun's exit status; a run stopped by a signal
    (preempted or interrupted, checkpointed at a step boundary) raises KeyboardInterrupt for SIGINT
    and `Preempted` otherwise, as the same job run in this process would."""
    from .config import ConfigError
    from .train.checkpoint import latest_checkpoint
    from .train.preemption import Preempted

    with tempfile.TemporaryDirectory(prefix="elastic_megatron_ranks_") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(to_yaml(cfg))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "elastic_megatron.cli", command, "--config", str(path)]
        code = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
    if code == 0:
        return
    if code == 130:
        raise KeyboardInterrupt
    if code > 128:
        ckpt = latest_checkpoint(Path(cfg.checkpoint.dir or Path(cfg.logging.out_dir) / "checkpoints"))
        step = int(ckpt.name.split("_")[-1]) if ckpt else 0
        raise Preempted(code - 128, step, str(ckpt or ""))
    raise ConfigError(f"`elastic-megatron {command}` on {ranks} local ranks failed with exit status {code} "
                      "(its error is above)")
