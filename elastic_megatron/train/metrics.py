"""Where numbers go: a JSONL file (always), W&B (offline unless configured), a progress bar."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..config import ConfigError, LoggingConfig, RunConfig, to_dict


class MetricsLogger:
    """Rank-0 sink for per-step records. Other ranks get an inert instance (enabled=False)."""

    def __init__(self, cfg: RunConfig, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.cfg: LoggingConfig = cfg.logging
        self.path = Path(self.cfg.out_dir) / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._drop_after(start_step)
        self._file = open(self.path, "a", buffering=1)
        if self.cfg.wandb_mode != "disabled":
            self._wandb = _init_wandb(cfg)
        if self.cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _drop_after(self, step: int) -> None:
        """Records of steps after the checkpoint a run resumes from were logged by a run that died
        before saving them (kill -9); they are redone, so the file keeps only steps <= `step`."""
        lines = self.path.read_text().splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(keep) != len(lines):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def progress(self, n: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _init_wandb(cfg: RunConfig):
    """A W&B run, or None where wandb is not installed and the run is offline (metrics.jsonl has it all).

    wandb is optional so that a bare GPU machine (nothing but the carried wheels, no network;
    benchmarks/device_wheels.sh) runs everything: an offline W&B run is only a copy of the JSONL.
    """
    out = Path(cfg.logging.out_dir)
    mode = cfg.logging.wandb_mode
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        mode = "offline"  # no key, no network: keep the run on disk, sync it later with `wandb sync`
    try:
        import wandb
    except ImportError:
        if mode == "online":
            raise ConfigError("config key 'logging.wandb_mode': online, but wandb is not installed; "
                              "pip install wandb==0.31.0, or use logging.wandb_mode=offline or disabled") from None
        print(f"elastic-megatron: wandb is not installed: metrics go to {out / 'metrics.jsonl'} only "
              "(pip install wandb==0.31.0 for an offline W&B run too)", file=sys.stderr, flush=True)
        return None
    return wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.logging.wandb_run_name or out.name,
        dir=str(out),
        mode=mode,
        config=to_dict(cfg),
        reinit="finish_previous",
    )
