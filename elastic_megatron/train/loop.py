"""The training loop on megatron's pipeline schedules.

One optimizer step:

    global batch (train.global_batch_size sequences)
      = DP ranks x micro-batches x micro_batch_size
    get_forward_backward_func() runs the micro-batches through this rank's pipeline stage
    (no pipelining, or 1F1B across stages), megatron DDP reduces grads over DP,
    the megatron optimizer clips and steps, and the loss is averaged over micro-batches and DP.

Which samples a step sees is a pure function of (step, micro-batch, DP rank), so a resumed run
reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..compat import native
from ..config import RunConfig, to_yaml
from ..data.build import build_datasets
from ..data.tokenizer import load_tokenizer
from ..model.hybrid import build_model, count_parameters, model_device, padded_vocab_size
from ..model.recompute import recompute_megatron_layers
from ..parallel import ParallelLayout, destroy_distributed, init_distributed
from .checkpoint import latest_checkpoint, load_checkpoint, remove_partial_saves, save_checkpoint
from .metrics import MetricsLogger
from .optim import build_optimizer, lr_at, set_lr, wrap_ddp
from .preemption import Preempted, PreemptionGuard


def run_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this run only
    checkpoint: str = ""
    metrics: str = ""
    params: int = 0


class StepBatches:
    """Micro-batches of one optimizer step for this DP rank, as an iterator megatron can consume."""

    def __init__(self, dataset, step: int, n_micro: int, mbs: int, gbs: int, dp_rank: int):
        self.dataset, self.n_micro, self.mbs = dataset, n_micro, mbs
        self.base = step * gbs + dp_rank * n_micro * mbs
        self.m = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.base + self.m * self.mbs
        self.m += 1
        samples = [self.dataset[(start + j) % len(self.dataset)] for j in range(self.mbs)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        if torch.cuda.is_available():
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        return batch


def masked_mean_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Per-token LM loss [b, s] -> mean over unmasked tokens (megatron's loss_func contract)."""
    mask = loss_mask.float()
    loss = (output.float() * mask).sum() / mask.sum().clamp(min=1.0)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def lm_forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(masked_mean_loss, batch["loss_mask"])


def reduce_step_loss(losses: list[dict], key: str = "lm loss") -> float:
    """Mean loss of a step on every rank: last PP stage -> all stages, then the mean over DP."""
    value = torch.zeros(1, dtype=torch.float64)
    if losses and ps.is_pipeline_last_stage():
        value[0] = torch.stack([d[key].double().cpu() for d in losses]).mean()
    if torch.cuda.is_available():
        value = value.cuda()
    dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    return float(value.item()) / ps.get_data_parallel_world_size()


def run_schedule(model, forward_step, data_iter, n_micro: int, cfg: RunConfig, seq_length: int,
                 forward_only: bool = False, micro_batch_size: int = 0, p2p_width: int = 1) -> list[dict]:
    """megatron's schedule for this layout. p2p_width: how many hidden-size activations travel between
    pipeline stages side by side (2 in elastic training: the student's and the frozen teacher's)."""
    extra = {}
    if p2p_width != 1 and ps.get_pipeline_model_parallel_world_size() > 1:
        widen = lambda shapes: [(*sh[:-1], sh[-1] * p2p_width) for sh in shapes]  # noqa: E731
        extra["adjust_tensor_shapes_fn"] = lambda recv, send: (widen(recv), widen(send))

    def native_forward_step(*args):  # the micro-batch's forward without the CPU device remap
        with native():
            return forward_step(*args)

    return get_forward_backward_func()(
        forward_step_func=native_forward_step,
        data_iterator=data_iter,
        model=[model],
        num_microbatches=n_micro,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size or cfg.train.micro_batch_size,
        forward_only=forward_only,
        **extra,
    )


def train(cfg: RunConfig, world_size: int | None = None) -> TrainResult:
    """Train the parent as configured; returns the per-step losses and where things went."""
    world_size = world_size or int(__import__("os").environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout.resolve(cfg, world_size, training=True)
    init_distributed(layout, cfg.train.seed)
    try:
        with PreemptionGuard() as guard:  # SIGTERM / SIGUSR1: checkpoint after the step, raise Preempted
            return _train(cfg, layout, guard)
    finally:
        destroy_distributed()


def _train(cfg: RunConfig, layout: ParallelLayout, guard: PreemptionGuard) -> TrainResult:
    t, rank0 = cfg.train, dist.get_rank() == 0
    dtype = run_dtype(t.precision)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(cfg.model, tokenizer.vocab_size, layout.tensor)
    train_ds, valid_ds = build_datasets(cfg, tokenizer, num_train=t.steps * t.global_batch_size)

    model = build_model(cfg, layout, vocab, dtype)
    recompute_megatron_layers(model, cfg.train.recompute)
    ddp_model = wrap_ddp(model, layout)
    optimizer = build_optimizer(ddp_model, t, layout, dtype)

    out_dir = Path(cfg.logging.out_dir)
    ckpt_root = Path(cfg.checkpoint.dir or out_dir / "checkpoints")
    start_step = 0
    resume_from = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    for stale in remove_partial_saves(ckpt_root):
        print(f"removed {stale}: a checkpoint save that never finished (the run resumes from 'latest')", flush=True)
    if resume_from is not None:
        start_step = int(load_checkpoint(resume_from, model, optimizer).get("step", 0))
    elif cfg.checkpoint.load:
        load_checkpoint(cfg.checkpoint.load, model)
        optimizer.reload_model_params()  # bf16: the fp32 main params were copied from the init
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    n_params = count_parameters(cfg.model, vocab)
    n_micro = t.global_batch_size // (t.micro_batch_size * layout.data)
    dp_rank = ps.get_data_parallel_rank()
    logger = MetricsLogger(cfg, enabled=rank0, total_steps=t.steps, start_step=start_step)
    if rank0 and resume_from is not None:
        print(f"resumed from {resume_from} at step {start_step}", flush=True)
    result = TrainResult(steps=t.steps, params=n_params, metrics=str(logger.path))
    seq = cfg.data.seq_length
    end_step = t.exit_at_step or t.steps
    for step in range(start_step, end_step):
        tic = time.perf_counter()
        lr = lr_at(step, t)
        set_lr(optimizer, lr)
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        data = StepBatches(train_ds, step, n_micro, t.micro_batch_size, t.global_batch_size, dp_rank)
        losses = run_schedule(ddp_model, lm_forward_step, data, n_micro, cfg, seq)
        ok, grad_norm, _ = optimizer.step()
        loss = reduce_step_loss(losses)
        result.losses.append(loss)
        dt = time.perf_counter() - tic
        tokens_per_s = t.global_batch_size * seq / dt
        if (step + 1) % cfg.logging.log_interval == 0 or step + 1 == t.steps:
            logger.log({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": float(grad_norm or 0.0),
                        "step_s": dt, "tokens_per_s": tokens_per_s, "skipped": not ok})
        logger.progress(1, loss=loss, tok_s=round(tokens_per_s))
        if t.eval_interval and ((step + 1) % t.eval_interval == 0 or step + 1 == t.steps):
            logger.log({"step": step + 1, "heldout_loss": evaluate(ddp_model, valid_ds, cfg, layout)})
        last = step + 1 == end_step
        signum = guard.stop_requested(model_device(model))
        if last or signum or (cfg.checkpoint.save_interval and (step + 1) % cfg.checkpoint.save_interval == 0):
            path = save_checkpoint(ckpt_root, step + 1, model, optimizer, {"step": step + 1})
            result.checkpoint = str(path)
        if signum and not last:
            logger.close()
            raise Preempted(signum, step + 1, result.checkpoint)
    logger.close()
    if not result.checkpoint:
        found = latest_checkpoint(ckpt_root)
        result.checkpoint = str(found) if found else ""
    return result


@torch.no_grad()
def evaluate(model, dataset, cfg: RunConfig, layout: ParallelLayout) -> float:
    """Mean held-out LM loss over train.eval_batches micro-batches per DP rank."""
    t = cfg.train
    model.eval()
    data = StepBatches(dataset, 0, t.eval_batches, t.micro_batch_size, t.eval_batches * t.micro_batch_size
                       * layout.data, ps.get_data_parallel_rank())
    losses = run_schedule(model, lm_forward_step, data, t.eval_batches, cfg, cfg.data.seq_length, forward_only=True)
    model.train()
    return reduce_step_loss(losses)
