"""Elastic training: one sorted parent, a router per axis, a frozen teacher, a budget curriculum.

For every micro-batch:

    budget b ~ stage.budget_probs               drawn from (seed, step, micro): identical on all ranks
                                                 (stage.budget_sampling=stratified: exact shares per window)
    decision = router(b)                         Gumbel-softmax, noise from (seed, step, micro, b)
                                                 (micro: the micro-batch's index in the global batch,
                                                 so a DP run draws what one process draws for it)
    student logits = parent under decision.subnet (hard: weight prefixes; soft: prefix masks),
                     each layer's output times its straight-through gate (value 1, router gradient)
    teacher logits = the frozen parent, full size (no grad, no optimizer state, never saved)
    loss = kd_weight * KL(teacher || student) + ce_weight * CE + router.budget_weight * budget loss
           (+ intermediate_weight * normalized MSE of chosen layers' residual streams, if configured)

The model steps with megatron's optimizer; the router (replicated on every rank) steps with its
own Adam after its gradients are averaged over all ranks. Stages run back to back (step counts,
sequence lengths, batch sizes and budget probabilities from `cfg.curriculum`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from ..config import ConfigError, RunConfig, StageConfig, to_yaml
from ..data.build import build_datasets
from ..data.tokenizer import load_tokenizer
from ..elastic.deploy import deployed_family
from ..elastic.distill import kd_loss
from ..elastic.model import ElasticHybrid, SoftMasks
from ..elastic.router import all_reduce_router_grads, build_router, router_optimizer
from ..elastic.sorting import load_parent
from ..elastic.subnet import Subnet, subnet_params
from ..model.hybrid import build_model, model_device, padded_vocab_size
from ..parallel import ParallelLayout, destroy_distributed, init_distributed
from .checkpoint import latest_checkpoint, loop_state, remove_partial_saves, resolve_checkpoint, save_checkpoint
from .deploy_score import deploy_scorer
from .loop import StepBatches, run_dtype, run_schedule
from .metrics import MetricsLogger
from .optim import build_optimizer, lr_at, set_lr, wrap_ddp
from .preemption import Preempted, PreemptionGuard


def draw_budget(probs: list[float], seed: int, step: int, micro: int) -> int:
    """The budget of one micro-batch: a pure function of (seed, step, micro), so every rank agrees."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)
    return int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=g).item())


def stratified_budget(probs: list[float], seed: int, slot: int) -> int:
    """The budget of the micro-batch at `slot` (its index among the stage's micro-batches, global
    batch order): windows of 10 x len(probs) slots each hold every budget round(p x window) times
    (largest remainder, so the counts sum to the window), in an order drawn from (seed, window).
    A pure function of (seed, slot) like draw_budget, so every rank and layout agrees."""
    n = 10 * len(probs)
    window, pos = divmod(slot, n)
    quota = [p * n for p in probs]
    counts = [int(q) for q in quota]
    for b in sorted(range(len(probs)), key=lambda b: counts[b] - quota[b])[:n - sum(counts)]:
        counts[b] += 1  # largest remainders first
    pool = [b for b, c in enumerate(counts) for _ in range(c)]
    g = torch.Generator().manual_seed((seed * 1_000_003 + window) * 1_013 + 7)
    return pool[int(torch.randperm(n, generator=g)[pos])]


def stage_probs(stage: StageConfig, n_budgets: int) -> list[float]:
    return list(stage.budget_probs) or [1.0 / n_budgets] * n_budgets


@dataclass
class ElasticResult:
    losses: list[float] = field(default_factory=list)  # per optimizer step (total loss)
    checkpoint: str = ""
    metrics: str = ""
    router: object = None  # the trained RouterSet (rank-local replica)
    layer_order: list[int] = field(default_factory=list)


def elastic_train(cfg: RunConfig, layer_order: list[int] | None = None) -> ElasticResult:
    """Elastic training of the sorted parent in checkpoint.load. `layer_order`: the depth ranking
    (most important first); default: the one in `elastic.importance_path`'s scores, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if layer_order is None and cfg.elastic.importance_path and Path(cfg.elastic.importance_path).exists():
        from ..elastic.importance import ImportanceScores

        layer_order = ImportanceScores.load(cfg.elastic.importance_path).layer_order
    layout = ParallelLayout.resolve(cfg, world, training=True)
    if layout.pipeline > 1 and cfg.distill.intermediate_layers:
        raise ConfigError("config key 'distill.intermediate_layers': intermediate-layer distillation needs the "
                          "whole model on one stage (parallel.pipeline=1); drop it or run without pipeline "
                          "parallelism")
    if not cfg.checkpoint.load and not latest_checkpoint(Path(cfg.checkpoint.dir or Path(cfg.logging.out_dir) /
                                                             "checkpoints")):
        raise ConfigError("config key 'checkpoint.load': elastic training starts from a sorted parent; "
                          "run `elastic-megatron importance` and pass its sorted checkpoint")
    parent = resolve_checkpoint(cfg.checkpoint.load) if cfg.checkpoint.load else None
    if parent is not None and (parent / "metadata.json").exists() and not cfg.elastic.sort_tensor_parallel:
        loop = loop_state(parent)
        if not (loop.get("sorted") or loop.get("ffn_layout_tp")):  # a plain `train` / import-hf checkpoint
            raise ConfigError(f"config key 'checkpoint.load': {parent} is not a sorted parent (every budget must be "
                              "a prefix of its channels and heads); run `elastic-megatron importance` on it and "
                              "pass the sorted checkpoint it writes")
    init_distributed(layout, cfg.train.seed)
    try:
        with PreemptionGuard() as guard:  # SIGTERM / SIGUSR1: checkpoint after the step, raise Preempted
            return _elastic_train(cfg, layout, layer_order, guard)
    finally:
        destroy_distributed()


def _elastic_train(cfg: RunConfig, layout: ParallelLayout, layer_order, guard: PreemptionGuard) -> ElasticResult:
    t, rank0 = cfg.train, dist.get_rank() == 0
    dtype = run_dtype(t.precision)
    tok = load_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(cfg.model, tok.vocab_size, layout.tensor)

    student = build_model(cfg, layout, vocab, dtype)
    teacher = build_model(cfg, layout, vocab, dtype)
    ddp = wrap_ddp(student, layout)
    total_steps = sum(st.steps for st in cfg.curriculum)
    sched_cfg = replace(t, steps=total_steps)
    optimizer = build_optimizer(ddp, t, layout, dtype)
    # choices are validated for this run's TP: load_parent lays the sorted FFN out for it
    # on the model's device (its Adam state follows at the first step): router collectives then run
    # on the backend's device (NCCL: CUDA tensors) and every loss term meets the model's tensors there
    router = build_router(cfg, vocab, layer_order=layer_order, tp=layout.tensor).to(model_device(student))
    router_opt = router_optimizer(router, cfg.router)

    out_dir = Path(cfg.logging.out_dir)
    ckpt_root = Path(cfg.checkpoint.dir or out_dir / "checkpoints")
    parent_ckpt = resolve_checkpoint(cfg.checkpoint.load) if cfg.checkpoint.load else ""
    if cfg.distill.teacher or parent_ckpt:
        # laid out like the student (re-laying keeps the function): the same weights in the same
        # order round the same, so KD at full size is exactly 0, as in one process (see below)
        load_parent(resolve_checkpoint(cfg.distill.teacher) if cfg.distill.teacher else parent_ckpt, teacher, cfg,
                    layout)
    # Frozen by running it under torch.no_grad() with no optimizer, *not* by requires_grad_(False):
    # ATen picks the GEMM for a 3-D input by the weight's requires_grad flag (matmul folds [s, b, k]
    # into one mm only for weights that require grad, whatever the grad mode), so a flagged-off
    # teacher rounds differently from the student holding the same weights. KD(teacher || student)
    # at full size would then be ~1e-8 instead of 0, and Adam's first step would turn that rounding
    # noise into ~lr-sized updates of weights whose true gradient is zero (different on every layout).
    teacher.eval()
    start = 0
    resume_from = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    for stale in remove_partial_saves(ckpt_root):
        print(f"removed {stale}: a checkpoint save that never finished (the run resumes from 'latest')", flush=True)
    if resume_from is not None:
        loop = load_parent(resume_from, student, cfg, layout, optimizer)
        start = int(loop.get("step", 0))
        router.load_state_dict(loop["router"])
        router_opt.load_state_dict(loop["router_opt"])
    else:
        load_parent(parent_ckpt, student, cfg, layout)
        # bf16: the optimizer's fp32 main params were copied from the random init when it was built
        optimizer.reload_model_params()
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    s_view, t_view = ElasticHybrid(student, cfg, layout), ElasticHybrid(teacher, cfg, layout)
    names = list(cfg.elastic.budgets)
    logger = MetricsLogger(cfg, enabled=rank0, total_steps=total_steps, start_step=start)
    result = ElasticResult(metrics=str(logger.path), router=router, layer_order=list(router.layer_order))
    hard = cfg.elastic.mode == "hard"
    fixed = router.fixed_subnets(cfg.elastic.subnets, layout.tensor)
    fixed_cost = {b: router.cost_of(s) for b, s in fixed.items()}
    # the family the first frozen stage deployed (a resumed run reuses the recorded one: the weights
    # it would score have moved since, and the checkpoint must name what slice will cut)
    chosen = [Subnet.from_dict(d) for d in loop["family"]] if resume_from is not None and loop.get("family") else None
    stage_start = 0
    for stage in cfg.curriculum:
        stage_end = stage_start + stage.steps
        if start >= stage_end:
            stage_start = stage_end
            continue
        seq = stage.seq_length or cfg.data.seq_length
        gbs, mbs = stage.global_batch_size or t.global_batch_size, stage.micro_batch_size or t.micro_batch_size
        n_micro = gbs // (mbs * layout.data)
        stage_cfg = replace(cfg, data=replace(cfg.data, seq_length=seq, min_steps=stage.min_steps or cfg.data.min_steps,
                                              max_steps=stage.max_steps or cfg.data.max_steps))
        train_ds, _ = build_datasets(stage_cfg, tok, num_train=stage.steps * gbs)
        probs = stage_probs(stage, len(names))
        s_view.recompute = stage.recompute or t.recompute  # the teacher runs without autograd: nothing to keep
        # A frozen stage runs the deployed family, computed from the router as it is now; the router
        # does not change in it, so a resumed run computes the same family again.
        frozen = stage.router == "frozen"
        if frozen:
            if chosen is None:  # the first frozen stage: choose (and record) the deployed family once
                score = (deploy_scorer(s_view, ddp, cfg, stage_cfg, tok, mbs, vocab)
                         if cfg.elastic.deploy_candidates > 1 else None)
                chosen = deployed_family(router, fixed, cfg.elastic.deploy_tolerance, score,
                                         cfg.elastic.deploy_candidates)
            family = chosen
            frozen_cost = [router.cost_of(s) for s in family]
        for step in range(max(start, stage_start), stage_end):
            tic = time.perf_counter()
            set_lr(optimizer, lr_at(step, sched_cfg))
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            router_opt.zero_grad()
            # One decision per micro-batch of the *global* batch, keyed by its global index: this DP
            # rank runs micro-batches [first, first + n_micro) (its samples, see StepBatches), so a DP
            # run draws for every sample the budget and subnet one process draws for it. The other
            # ranks' decisions are made without autograd, only to log the step's subnets.
            first = ps.get_data_parallel_rank() * n_micro
            decisions = []
            for gm in range(n_micro * layout.data):
                b = (stratified_budget(probs, t.seed, (step - stage_start) * n_micro * layout.data + gm)
                     if stage.budget_sampling == "stratified" else draw_budget(probs, t.seed, step, gm))
                with torch.set_grad_enabled(first <= gm < first + n_micro and not frozen):
                    dec = router(b, step=step, total_steps=total_steps, seed=t.seed, hard=hard, micro=gm)
                if frozen:  # the deployed subnet, sliced compute, no router loss
                    dec = fixed_decision(dec, family[b], frozen_cost[b])
                elif b in fixed:  # the full model, or a hand-picked subnet: no router choice to make
                    dec = fixed_decision(dec, fixed[b], fixed_cost[b])
                decisions.append(dec)
            mine = decisions[first:first + n_micro]
            fwd = partial(_forward_step, s_view, t_view, mine, router, cfg)
            data = StepBatches(train_ds, step - stage_start, n_micro, mbs, gbs, ps.get_data_parallel_rank())
            # the p2p tensor between stages is the student's and the teacher's activations side by side
            outs = run_schedule(ddp, fwd, data, n_micro, cfg, seq, micro_batch_size=mbs, p2p_width=2)
            # stages hold different parts of the router gradient (their layers' gates): sum them,
            # average over the DP x TP replicas of each part
            if not frozen:  # (Adam would still move a router with zero gradients, by its moments)
                all_reduce_router_grads(router, replicas=layout.data * layout.tensor)
                router_opt.step()
            ok, grad_norm, _ = optimizer.step()
            record = _reduce_metrics(outs, mine, decisions, names, cfg.model, vocab, model_device(student))
            dt = time.perf_counter() - tic
            record.update(step=step + 1, stage=stage.name, lr=lr_at(step, sched_cfg), grad_norm=float(grad_norm or 0),
                          step_s=dt, tokens_per_s=gbs * seq / dt)
            result.losses.append(record["loss"])
            logger.log(record)
            logger.progress(1, stage=stage.name, loss=record["loss"], budgets=record["budgets_seen"],
                            tok_s=round(record["tokens_per_s"]))
            signum = guard.stop_requested(model_device(student))
            if signum or step + 1 == stage_end or (cfg.checkpoint.save_interval and
                                                   (step + 1) % cfg.checkpoint.save_interval == 0):
                # with the config and the depth ranking, the checkpoint is all that slice / export-hf /
                # generate need (budgets, router, layer order, tokenizer: checkpoint_config)
                state = {"step": step + 1, "router": router.state_dict(), "router_opt": router_opt.state_dict(),
                         "ffn_layout_tp": layout.tensor, "layer_order": list(router.layer_order),
                         "config": to_yaml(cfg)}
                if chosen is not None:
                    state["family"] = [sub.to_dict() for sub in chosen]
                result.checkpoint = str(save_checkpoint(ckpt_root, step + 1, student, optimizer, state))
            if signum and step + 1 < total_steps:
                logger.close()
                raise Preempted(signum, step + 1, result.checkpoint)
        stage_start = stage_end
    logger.close()
    return result


def fixed_decision(dec, subnet, cost: int):
    """`dec` made to run a fixed subnet (the full model or a hand-picked one): gates 1, no budget
    loss, its exact cost; every tensor where the router's are."""
    return replace(dec, subnet=subnet, layer_gates=torch.ones_like(dec.layer_gates), budget_loss=dec.budget_loss * 0,
                   fixed=True, expected_cost=torch.full((), float(cost), dtype=torch.float64,
                                                        device=dec.budget_loss.device))


def _forward_step(s_view, t_view, decisions, router, cfg: RunConfig, data_iterator, model):
    batch = next(data_iterator)
    micro = getattr(data_iterator, "m", 1) - 1
    dec = decisions[micro]
    masks = None
    if cfg.elastic.mode == "soft" and not dec.fixed:  # a fixed subnet (full or hand-picked) runs hard
        masks = SoftMasks.of(router.soft_masks(dec))
    layers = cfg.distill.intermediate_layers
    s_states, t_states = dict.fromkeys(layers), dict.fromkeys(layers)
    s_in = t_in = None
    if not s_view.model.pre_process:  # a later pipeline stage: [s, b, 2h] = student | teacher from the last
        both = s_view.model.decoder.input_tensor
        s_in, t_in = both.split(both.shape[-1] // 2, dim=-1)
    student = s_view(batch["tokens"], batch["position_ids"], None, subnet=dec.subnet, gates=dec.layer_gates,
                     masks=masks, collect=s_states if layers else None, hidden_in=s_in)  # [b, s, V/tp] or [s, b, h]
    with torch.no_grad():
        teacher = t_view(batch["tokens"], batch["position_ids"], None, collect=t_states if layers else None,
                         hidden_in=t_in.detach() if t_in is not None else None)
    if not s_view.model.post_process:  # send both on; megatron calls the loss on the last stage only
        return torch.cat([student, teacher], dim=-1), None
    hidden = _intermediate_loss(s_states, t_states, masks, batch["loss_mask"]) if layers else None
    return student, partial(_loss, batch, teacher, dec, cfg, hidden)


def _intermediate_loss(s_states: dict, t_states: dict, masks, loss_mask) -> torch.Tensor:
    """Mean over layers of sum((student - teacher)^2) / sum(teacher^2) on the student's hidden channels
    (the kept prefix in hard mode, the masked teacher in soft mode) and the non-pad tokens."""
    tok = loss_mask.float().transpose(0, 1)[..., None]  # [s, b, 1]
    out = []
    for i, st in s_states.items():
        te = t_states[i][..., :st.shape[-1]]
        if masks is not None:
            te = te * masks.hidden
        out.append(((st - te).pow(2) * tok).sum() / (te.pow(2) * tok).sum().clamp(min=1e-12))
    return torch.stack(out).mean()


def _loss(batch, teacher, dec, cfg: RunConfig, hidden, student):
    d, mask = cfg.distill, batch["loss_mask"].float()
    denom = mask.sum().clamp(min=1.0)
    kd = (kd_loss(student, teacher, d.temperature) * mask).sum() / denom
    ce = (tensor_parallel.vocab_parallel_cross_entropy(student.float().transpose(0, 1).contiguous(),
                                                       batch["labels"].transpose(0, 1).contiguous()).transpose(0, 1)
          * mask).sum() / denom
    router_loss = dec.budget_loss
    total = d.kd_weight * kd + d.ce_weight * ce + cfg.router.budget_weight * router_loss
    if hidden is None:
        hidden = torch.zeros((), device=kd.device)
    else:
        total = total + d.intermediate_weight * hidden
    stats = torch.stack([total.detach(), kd.detach(), ce.detach(), router_loss.detach().float(),
                         dec.expected_cost.detach().float(), hidden.detach().float()]).clone()
    return total, {"stats": stats}


def _reduce_metrics(outs: list[dict], mine, decisions, names: list[str], m, vocab: int,
                    device: torch.device) -> dict:
    """Per-budget means over the micro-batches of all DP ranks, on every rank. `mine`: this rank's
    decisions (one per entry of `outs`, which only the last pipeline stage has); `decisions`: those of the whole global batch (the same list on every rank), whose
    first micro-batch of a budget gives that budget's logged subnet."""
    n = len(names)
    # total, kd, ce, router, expected cost, intermediate; count. Summed on the model's device, where the
    # losses are and the collectives run (one copy to the host at the end, not one per micro-batch).
    sums = torch.zeros(n, 7, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():  # the losses exist there only; the other stages add zeros below
        assert len(outs) == len(mine) > 0, (len(outs), len(mine))
        idx = torch.tensor([dec.budget_idx for dec in mine], device=device)
        onehot = (idx[:, None] == torch.arange(n, device=device)).double()  # [micro, budgets]
        stats = torch.stack([out["stats"] for out in outs]).to(device, torch.float64)  # [micro, 6]
        # a matmul, not index_add_: CUDA's index_add_ adds with atomics, in no fixed order
        sums[:, :6] = onehot.t() @ stats
        sums[:, 6] = onehot.sum(0)
    dist.all_reduce(sums, group=ps.get_data_parallel_group())
    dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())  # last stage -> every stage (rank 0 logs)
    sums = sums.cpu()
    record: dict = {}
    total = sums[:, 0].sum() / sums[:, 6].sum().clamp(min=1)
    record["loss"] = float(total)
    seen = []
    for b, name in enumerate(names):
        c = sums[b, 6]
        if c == 0:
            continue
        seen.append(name)
        mean = sums[b, :6] / c
        dec = next(x for x in decisions if x.budget_idx == b)
        record.update({f"{name}/loss": float(mean[0]), f"{name}/kd": float(mean[1]), f"{name}/ce": float(mean[2]),
                       f"{name}/router_loss": float(mean[3]), f"{name}/expected_params": float(mean[4]),
                       f"{name}/intermediate": float(mean[5]),
                       f"{name}/chosen_params": subnet_params(dec.subnet, m, vocab),
                       f"{name}/subnet": dec.subnet.to_dict()})
    record["budgets_seen"] = ",".join(seen)
    return record
