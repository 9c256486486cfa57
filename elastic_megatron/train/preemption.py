"""Preemption without lost steps: SIGTERM / SIGUSR1 / Ctrl-C -> checkpoint at the next step boundary, exit.

SLURM sends SIGTERM on `scancel`, preemption and the time limit (and `--signal=USR1@T` before
it); torchrun forwards SIGTERM to its workers. The handler only sets a flag. After each optimizer
step the loop asks `stop_requested()`: the ranks agree (an all-reduce MAX, so a signal that
reached one rank stops every rank at the same step), the loop saves a checkpoint of the step it
has just finished, and the job ends with `Preempted` -> exit code 128 + signal (143 for SIGTERM),
which is not success: SLURM's `afterok` chains do not start the next job, and a requeued or
re-run job resumes from that checkpoint with nothing redone. Ctrl-C (SIGINT) does the same, so an
interactive run stopped by hand loses nothing either; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the CLI exits with 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"preempted by {signal.Signals(signum).name} after step {step}: checkpoint {checkpoint}; "
                         "rerun the same command to resume")


class PreemptionGuard:
    """Context manager: while active, the signals above only set a flag (previous handlers come back after)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> "PreemptionGuard":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        self.signum = self.signum or signum

    def stop_requested(self, device: torch.device) -> int:
        """The signal any rank received (0 = none), the same on every rank. One small all-reduce per
        step, on the backend's device."""
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
