"""Checkpoints with megatron's dist_checkpointing, written atomically.

Layout under the checkpoint root:

    iter_0000010/      one dist_checkpointing directory (model, optimizer, loop state)
    latest             the name of the newest complete iter_* directory

A save goes to `iter_N.tmp/` first and is renamed only after every rank has finished writing, and
`latest` is replaced atomically afterwards, so a crash mid-save never leaves a checkpoint that
looks complete. dist_checkpointing stores tensors by their global (TP=1) coordinates, so a
checkpoint written with one TP x PP layout loads under another.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from ..config import ConfigError
from ..model.weights import LEGACY_NORM_KEYS


class CheckpointError(ConfigError):
    """A checkpoint that exists but cannot be used; the message names it and says what to do (a
    ConfigError: checkpoint.load is configuration, and the CLI reports it the same way)."""


def unreadable(path: str | Path, exc: Exception) -> CheckpointError:
    """What to tell a user when dist_checkpointing could not read `path` (the library's own error is
    a long traceback ending in e.g. EOFError or a shape mismatch deep inside torch.distributed)."""
    failures = getattr(exc, "failures", None)  # torch's CheckpointException: {rank: (exception, traceback)}
    if failures:
        first = next(iter(failures.values()))
        exc = first[0] if isinstance(first, tuple) else first
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.split(". This is an internal")[0]  # torch's zip reader appends a paragraph of advice
    if any(s in text.lower() for s in ("shape mismatch", "size mismatch", "missing key", "unexpected key")):
        return CheckpointError(f"'{path}' holds another model than this config builds ({text[:240]}); give the "
                               "model.* settings it was saved with (its run's config.yaml) or another checkpoint")
    return CheckpointError(f"'{path}' cannot be read ({type(exc).__name__}: {text[:160]}): an incomplete or "
                           "corrupted save; point checkpoint.load at a complete checkpoint, or delete this one so "
                           "the run resumes from the one before")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    marker = Path(root) / "latest"
    if not marker.exists():
        return None
    path = Path(root) / marker.read_text().strip()
    return path if path.is_dir() else None


def remove_partial_saves(root: str | Path) -> list[str]:
    """Delete `iter_*.tmp` directories under root: saves that a crash interrupted (a complete save is
    renamed away from .tmp before `latest` names it, so none of them was ever a checkpoint). Rank 0
    only; returns what was removed, for the run's log."""
    if _rank() != 0 or not Path(root).is_dir():
        return []
    stale = sorted(p for p in Path(root).glob("iter_*.tmp") if p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [str(p) for p in stale]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given, or the newest one under a checkpoints dir (or a run dir holding
    `checkpoints/`) whose `latest` names one; `path` itself when neither has a `latest` marker."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    return p


def loop_state(ckpt: str | Path) -> dict:
    """The loop state a checkpoint directory recorded (step, and for sorted / elastic / imported
    models their layer order, FFN layout and config), read without loading any tensor."""
    try:
        return dist_checkpointing.load_common_state_dict(str(ckpt)).get("loop", {})
    except (Exception, CheckpointException) as exc:
        raise unreadable(ckpt, exc) from None


def checkpoint_config(path: str | Path, overrides: list[str] | None = None):
    """The RunConfig a checkpoint was written with: the YAML its loop state records (elastic-train,
    importance and import-hf checkpoints do), else the run directory's config.yaml beside
    `checkpoints/`; dotted `overrides` on top. Raises FileNotFoundError when neither exists."""
    from ..config import load_config

    if not Path(path).exists():
        raise FileNotFoundError(f"'{path}' does not exist; give a run directory or checkpoint written by train, "
                                "importance, elastic-train or import-hf")
    ckpt = resolve_checkpoint(path)
    if (ckpt / "metadata.json").exists():
        loop = loop_state(ckpt)
        if loop.get("config"):
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                f.write(loop["config"])
            try:
                return load_config(f.name, overrides)
            finally:
                os.unlink(f.name)
    for run_dir in (Path(path), ckpt.parent.parent, ckpt.parent):
        if (run_dir / "config.yaml").exists():
            return load_config(str(run_dir / "config.yaml"), overrides)
    raise FileNotFoundError(f"'{path}': no checkpoint recording its config and no config.yaml in its run "
                            "directory; pass --config")


def _save_strategy():
    """megatron's default writer forks worker processes; on our gloo/CPU runs those children die
    silently and the save hangs forever in `count_queue.join()` (seen with megatron-core 0.16.1).
    Off CUDA we therefore write synchronously in-process with torch.distributed.checkpoint's own
    FileSystemWriter; the files and metadata are the same torch_dist format, loaded the same way."""
    if torch.cuda.is_available():
        return None  # megatron's default (parallel, forked writers)
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp_save(
                mcore_to_pyt_state_dict(state, False),
                storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                         flatten_state_dict=False),
            )

    return InProcessTorchDistSave("torch_dist", 1)


def _has_legacy_norm_keys(path: Path) -> bool:
    """Whether the checkpoint stores pre-norms under the old local-spec names (written before
    model/weights.py's canonical keys): then they are read from there."""
    keys = dist_checkpointing.load_tensors_metadata(str(path)).keys()
    legacy = any(k.endswith(tuple("." + v for v in LEGACY_NORM_KEYS.values())) and ".mixer.norm." not in k
                 for k in keys if k.startswith("decoder.layers."))
    return legacy and not any(k.endswith(tuple(LEGACY_NORM_KEYS)) for k in keys)


def _rename_legacy(sharded: dict) -> None:
    """Point the model's pre-norm entries at their old checkpoint keys (and so the optimizer's)."""
    for entry in sharded.values():
        key = getattr(entry, "key", None)
        for new, old in LEGACY_NORM_KEYS.items():
            if isinstance(key, str) and key.endswith(new):
                entry.key = key[: -len(new)] + old


def _sharded_state(model, optimizer, is_loading: bool, legacy_norms: bool = False) -> dict:
    state = {"model": model.sharded_state_dict()}
    if legacy_norms:
        _rename_legacy(state["model"])
    if optimizer is not None:
        # fully_reshardable: optimizer state stored in model space, so a checkpoint written with
        # one DP size (or with the distributed optimizer off) loads under another.
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    return state


def save_checkpoint(root: str | Path, step: int, model, optimizer, loop_state: dict) -> Path:
    """Write model (the unwrapped MegatronModule), optimizer and loop_state at `step`; returns the dir."""
    root = Path(root)
    final, tmp = root / f"iter_{step:07d}", root / f"iter_{step:07d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state["loop"] = {**loop_state, "adam_step": _adam_step(optimizer)} if optimizer is not None else loop_state
    dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy())
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, root / "latest")
    _barrier()
    return final


def _materialize_optimizer_state(optimizer) -> None:
    """The distributed optimizer can only describe (and so load) its state once it exists, and
    torch's Adam creates state lazily at the first step. megatron's own remedy is a dummy step
    with zero grads; we run it at lr=0 so it cannot move the weights."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not hasattr(opt, "_init_optimizer_states_with_dummy_values") or inner is None or inner.state:
            continue
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        opt._init_optimizer_states_with_dummy_values()
        for g, lr in zip(inner.param_groups, lrs):
            g["lr"] = lr


def _adam_states(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield from getattr(getattr(opt, "optimizer", None), "state", {}).values()


def _adam_step(optimizer) -> float:
    steps = [float(st["step"]) for st in _adam_states(optimizer) if "step" in st]
    return max(steps) if steps else 0.0


def _restore_adam_steps(optimizer, step: float) -> None:
    """Without apex/TE, megatron's DistributedOptimizer does not round-trip torch Adam's per-param
    `step` (dp_reshardable leaves the dummy step's 1; another path shares one tensor between all
    parameters), which corrupts the bias correction: resumed losses drifted from the straight
    run. We save the step in the loop state and give every parameter its own copy back."""
    for state in _adam_states(optimizer):
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = torch.tensor(step, dtype=state["step"].dtype)


def load_checkpoint(path: str | Path, model, optimizer=None) -> dict:
    """Load model (and optimizer, if given) in place from `path`; returns the saved loop state."""
    path = Path(path)
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"'{path}' is not a dist_checkpointing checkpoint (no metadata.json)")
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state(model, optimizer, is_loading=True, legacy_norms=_has_legacy_norm_keys(path))
    state["loop"] = {}
    try:
        loaded = dist_checkpointing.load(state, str(path))
        loop = loaded.get("loop") or dist_checkpointing.load_common_state_dict(str(path)).get("loop", {})
        model.load_state_dict(loaded["model"])
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise unreadable(path, exc) from None
    if optimizer is not None:
        with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
            optimizer.load_state_dict(loaded["optimizer"])
        if "adam_step" in loop:
            _restore_adam_steps(optimizer, loop["adam_step"])
    return loop
