"""The parallel layout (TP x PP x DP = world size): validated once, then handed to megatron.

`ParallelLayout.resolve(cfg, world_size)` checks every divisibility rule up front and says what to
change ("mamba heads 16 not divisible by TP 3"), instead of letting a shape assert fire deep in a
layer constructor on one rank. `init_distributed` starts torch.distributed (gloo on CPU, nccl on
GPU) and megatron's `parallel_state` from that layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int
    pipeline: int
    data: int
    layers_in_first_stage: int | None
    layers_in_last_stage: int | None
    distributed_optimizer: bool
    backend: str  # nccl or gloo
    sequence_parallel: bool = False  # parallel.sequence_parallel in a training job, TP > 1

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @staticmethod
    def resolve(cfg: RunConfig, world_size: int, training: bool = False) -> "ParallelLayout":
        """`training`: train / elastic-train, the jobs that run parallel.sequence_parallel (the others --
        importance, slice, export, generate -- replicate their activations; no weight depends on it)."""
        p, m, t = cfg.parallel, cfg.model, cfg.train
        tp, pp = p.tensor, p.pipeline
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if world_size % (tp * pp):
            raise ConfigError(
                f"config key 'parallel.tensor': TP {tp} x PP {pp} = {tp * pp} does not divide the world size "
                f"{world_size}; launch a multiple of {tp * pp} processes or change parallel.tensor/pipeline")
        dp = p.data or world_size // (tp * pp)
        if tp * pp * dp != world_size:
            raise ConfigError(
                f"config key 'parallel.data': TP {tp} x PP {pp} x DP {dp} = {tp * pp * dp} != world size "
                f"{world_size}; set parallel.data=0 to derive it")
        checks = [
            ("model.mamba_num_heads", m.mamba_num_heads, "mamba heads"),
            ("model.mamba_num_groups", m.mamba_num_groups, "mamba groups"),
            ("model.num_attention_heads", m.num_attention_heads, "attention heads"),
            ("model.num_query_groups", m.num_query_groups, "query groups"),
            ("model.ffn_hidden_size", m.ffn_hidden_size, "ffn hidden size"),
        ]
        for key, value, what in checks:
            if value % tp:
                raise ConfigError(f"config key '{key}': {what} {value} not divisible by TP {tp}; "
                                  f"change {key} or parallel.tensor")
        if m.vocab_size and m.vocab_size % (m.make_vocab_size_divisible_by * tp):
            raise ConfigError(
                f"config key 'model.vocab_size': {m.vocab_size} not divisible by "
                f"make_vocab_size_divisible_by x TP = {m.make_vocab_size_divisible_by * tp}; set model.vocab_size=0 "
                "to pad automatically")
        first, last = p.layers_in_first_stage, p.layers_in_last_stage
        stage_sizes(m.num_layers, pp, first, last)  # raises on a bad split
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"config key 'train.global_batch_size': {t.global_batch_size} not divisible by "
                f"micro_batch_size x DP = {t.micro_batch_size} x {dp}; change the batch sizes or parallel.data")
        backend = p.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("config key 'parallel.backend': nccl needs CUDA GPUs; use gloo or auto on CPU")
        return ParallelLayout(tp, pp, dp, first, last, p.distributed_optimizer, backend,
                              training and p.sequence_parallel and tp > 1)


def stage_sizes(num_layers: int, pp: int, first: int | None, last: int | None) -> list[int]:
    """Layers per pipeline stage, the same split megatron's MambaStack makes (uneven allowed)."""
    if pp == 1:
        if first is not None or last is not None:
            raise ConfigError("config key 'parallel.layers_in_first_stage': uneven stages need parallel.pipeline > 1")
        return [num_layers]
    head = [first] if first is not None else []
    tail = [last] if last is not None else []
    middle_stages = pp - len(head) - len(tail)
    rest = num_layers - sum(head) - sum(tail)
    if any(x < 1 for x in head + tail) or rest < 0 or (middle_stages == 0 and rest != 0):
        raise ConfigError(
            f"config key 'parallel.layers_in_first_stage': first={first}, last={last} cannot split "
            f"{num_layers} layers over {pp} stages")
    if middle_stages and (rest % middle_stages or rest // middle_stages < 1):
        what = "the layers left after the first/last stages" if head or tail else "the layers"
        raise ConfigError(
            f"config key 'parallel.pipeline': {what} ({rest}) do not split evenly over {middle_stages} "
            f"stages; set parallel.layers_in_first_stage / layers_in_last_stage")
    return head + [rest // middle_stages] * middle_stages + tail if middle_stages else head + tail


def init_distributed(layout: ParallelLayout, seed: int) -> None:
    """torch.distributed + megatron parallel_state + model-parallel RNG, from torchrun's env vars."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from . import compat

    compat.install()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if layout.backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # one process outside torchrun: an in-memory store, so no port is bound and no MASTER_* is
        # written into this process's environment (a subprocess it starts would inherit them)
        store = dist.HashStore() if world == 1 and "MASTER_ADDR" not in os.environ else None
        dist.init_process_group(layout.backend, rank=rank, world_size=world, store=store,
                                timeout=timedelta(minutes=10))
    if dist.get_world_size() != layout.world_size:
        raise ConfigError(f"layout needs {layout.world_size} processes but {dist.get_world_size()} were launched")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor,
            pipeline_model_parallel_size=layout.pipeline,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """End this job's megatron groups. Under torchrun the default process group stays up until the
    process exits: a second job in the same process (import then check, export then generate)
    re-creating it would find the first one's rendezvous keys in torchrun's store, and its groups
    would dial ranks that no longer listen (gloo: "Connection refused")."""
    import atexit

    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if not dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        global _EXIT_HOOK
        if not _EXIT_HOOK:
            atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
            _EXIT_HOOK = True
        return
    dist.destroy_process_group()


_EXIT_HOOK = False
