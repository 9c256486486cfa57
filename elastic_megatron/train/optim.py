"""megatron DDP, megatron's optimizer (plain or distributed) and the warmup + cosine LR schedule."""

from __future__ import annotations

import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from ..config import TrainConfig
from ..parallel import ParallelLayout


def wrap_ddp(model: torch.nn.Module, layout: ParallelLayout) -> DistributedDataParallel:
    """megatron's DDP: contiguous grad buffers, reduce over DP (scatter when the optimizer shards)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model: DistributedDataParallel, t: TrainConfig, layout: ParallelLayout, dtype: torch.dtype):
    config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=1e-8,
        clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [model])
    # The schedules call these hooks: without finalize_model_grads the DP all-reduce never runs.
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to t.lr over warmup_steps, then cosine decay to t.min_lr at t.steps."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
