"""Importance of every elastic axis from forward passes on calibration batches (paper §2, Minitron).

Width. Forward hooks see activations `act [s, b, C]` of this rank; per calibration micro-batch

    stat[C] += act.abs().mean(dim=seq).pow(2).sum(dim=batch)        (fp32)

and after the last batch `score = sqrt(stat)`: mean over sequence, L2 over batch (ModelOpt's
mcore_minitron). `stat` is a sum, so batches, DP ranks and PP stages just add up.

    hidden [h]            output of every pre-norm (Mamba `norm`, `input_layernorm`,
                          `pre_mlp_layernorm`; TE: the norm fused into in_proj / linear_qkv /
                          linear_fc1) and of `decoder.final_norm`: one score vector per norm,
                          summed over norms
    ffn[k] [ffn]          input of `linear_fc2` (the squared-ReLU intermediate)
    attn[k] [heads]       input of `linear_proj` [s, b, heads * d]: per-channel score, L2 over d
    mamba_*[k]            x segment of `in_proj`'s output [s, b, H * P] -> s[H, P]
                          mamba_head_dim [P] = ||s[:, p]||_2 (over heads)
                          mamba_heads [H]    = ||s[h, top]||_2 (top channels; all by default)

Depth (`layer_order`, most important first).
    nmse    iterative greedy removal: in round r every still-present layer j is tried as the
            identity together with the layers removed so far; s_j = sum (full - removed)^2 /
            sum full^2 over the calibration logits; the j with the smallest s_j goes. Removal
            order reversed = layer_order. `layer_scores` = round-0 (single-removal) nmse.
            L layers cost L (L + 1) / 2 forward passes over the calibration batches.
    cosine  layer_scores[j] = mean over tokens of 1 - cos(layer input, layer output), one pass.

Parallelism. All scores are global (TP=1 indexing) and identical on every rank. Passes run
through megatron's forward-only pipeline schedule, so PP works (hooks fire on the stage that owns
a layer; stats are summed over PP with zeros elsewhere). TP shards of ffn / attention / Mamba x
are contiguous in global order (a rank owns heads [r H/tp, (r+1) H/tp)), so an all_gather + cat
restores the global vector. Vocab-parallel logits: the nmse sums are all-reduced over TP. Give
each DP rank its own calibration batches (`calibration_batches`); stats are summed over DP.
The full model's logits are kept on the last stage for nmse: few small batches, please.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..compat import native
from ..config import ModelConfig, RunConfig
from ..parallel import ParallelLayout, stage_sizes
from .subnet import layer_slots


@dataclass
class ImportanceScores:
    """Global (TP=1-indexed) scores, higher = more important. Lists are per layer of that type."""

    hidden: torch.Tensor  # [h]
    ffn: list[torch.Tensor]  # per MLP layer [ffn]
    attn: list[torch.Tensor]  # per attention layer [num_heads]
    mamba_head_dim: list[torch.Tensor]  # per Mamba layer [head_dim]
    mamba_heads: list[torch.Tensor]  # per Mamba layer [num_heads] (group-major)
    layer_order: list[int]  # layer indices, most important first
    layer_scores: list[float] = field(default_factory=list)  # per layer (see module docstring)
    depth_metric: str = "nmse"

    def save(self, path) -> None:
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @staticmethod
    def load(path) -> "ImportanceScores":
        return ImportanceScores(**torch.load(path, map_location="cpu", weights_only=True))


def calibration_batches(dataset, cfg: RunConfig, layout: ParallelLayout) -> list[dict]:
    """This DP rank's share of the `elastic.importance_batches` calibration micro-batches."""
    from ..train.loop import StepBatches

    mbs, dp = cfg.train.micro_batch_size, layout.data
    n = max(1, cfg.elastic.importance_batches // dp)
    it = StepBatches(dataset, 0, n, mbs, n * mbs * dp, ps.get_data_parallel_rank())  # endless iterator
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- helpers

def _stat(act: torch.Tensor) -> torch.Tensor:
    """[s, b, *C] -> [*C]: mean |act| over the sequence, squared, summed over the batch."""
    return act.detach().float().abs().mean(dim=0).pow(2).sum(dim=0)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # megatron DDP / Float16Module
        model = model.module
    return model


def _stage_offset(m: ModelConfig, layout: ParallelLayout) -> int:
    sizes = stage_sizes(m.num_layers, layout.pipeline, layout.layers_in_first_stage, layout.layers_in_last_stage)
    return sum(sizes[: ps.get_pipeline_model_parallel_rank()])


def _all_reduce(t: torch.Tensor, *groups) -> torch.Tensor:
    for g in groups:
        if dist.get_world_size(g) > 1:
            dist.all_reduce(t, group=g)
    return t


def _tp_gather(local: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D per-rank shard over the TP group, in rank order."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts)


def _fused_norm(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of the RMSNorm Transformer Engine fuses into a linear (it never leaves the kernel)."""
    w = mod.layer_norm_weight.float() + (1.0 if getattr(mod, "zero_centered_gamma", False) else 0.0)
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.eps) * w


def _norms(layer: torch.nn.Module):
    """(slot, module, fused) for the real norms of a layer; slot 0 = mixer side, 1 = MLP side."""
    for slot, attr, fused in ((0, "norm", None), (0, "input_layernorm", "self_attention.linear_qkv"),
                              (0, None, "mixer.in_proj"), (1, "pre_mlp_layernorm", "mlp.linear_fc1")):
        mod = getattr(layer, attr, None) if attr else None
        if mod is not None and any(True for _ in mod.parameters()):  # IdentityOp has none
            yield slot, mod, False
        sub = layer.get_submodule(fused) if fused and _has(layer, fused) else None
        if sub is not None and hasattr(sub, "layer_norm_weight"):
            yield slot, sub, True


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _identity(layer: torch.nn.Module):
    """A forward that returns the layer's input, in the layer's own output convention."""
    returns_pair = isinstance(layer, TransformerLayer)  # TransformerLayer / MLPLayer: (hidden, context)

    def forward(*args, **kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (h, None) if returns_pair else h
    return forward


@contextmanager
def removed_layers(model: torch.nn.Module, removed: Iterable[int], offset: int):
    """Make the given global layers the identity on this stage (their forward is not even run)."""
    layers = _unwrap(model).decoder.layers
    patched = [layers[i - offset] for i in removed if 0 <= i - offset < len(layers)]
    for layer in patched:
        layer.forward = _identity(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


def run_forward(model: torch.nn.Module, batches: list[dict], on_logits: Callable[[int, torch.Tensor], None]) -> None:
    """Forward every micro-batch through this stage with the forward-only schedule; on the last
    stage `on_logits(i, logits [b, s, V/TP])` sees micro-batch i's logits."""
    def step(data_iterator, mdl):
        i, batch = next(data_iterator)
        with native():  # without the CPU device remap: the forward and its hooks are CPU tensors only
            out = mdl(batch["tokens"], batch["position_ids"], None)

        def loss_func(logits):
            on_logits(i, logits.detach())
            return torch.zeros((), device=logits.device), {}
        return out, loss_func

    b, s = batches[0]["tokens"].shape
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter(list(enumerate(batches))),
                                model=[model], num_microbatches=len(batches), seq_length=s,
                                micro_batch_size=b, forward_only=True)


# ----------------------------------------------------------------------------- estimation

@torch.no_grad()
def estimate_importance(model: torch.nn.Module, batches: list[dict], cfg: RunConfig, layout: ParallelLayout,
                        mamba_top_head_dim: Optional[int] = None) -> ImportanceScores:
    """Scores for every axis of this (possibly TP x PP x DP) parent; identical on every rank.

    `batches`: this DP rank's calibration micro-batches (dicts with tokens / position_ids, see
    `calibration_batches`). mamba_top_head_dim: channels the Mamba head score uses (None = all).
    """
    m, inner, batches = cfg.model, _unwrap(model), list(batches)
    if inner.config.sequence_parallel:
        raise NotImplementedError("importance estimation does not support sequence parallelism")
    dev, L, offset = next(inner.parameters()).device, m.num_layers, _stage_offset(m, layout)
    cosine = cfg.elastic.depth_metric == "cosine"
    acc: dict[tuple, torch.Tensor] = {}
    cos = torch.zeros(2, L, device=dev, dtype=torch.float64)  # [sum of 1 - cos, tokens] per layer
    hooks = _register_hooks(inner, m, offset, acc, cos if cosine else None)
    full_logits: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        try:
            keep = lambda i, lg: None if cosine else full_logits.__setitem__(i, lg.float().clone())  # noqa: E731
            run_forward(model, batches, keep)
        finally:
            for h in hooks:
                h.remove()
        score = {key: v.sqrt().cpu() for key, v in _global_stats(acc, m, inner, offset, dev).items()}
        if cosine:
            _all_reduce(cos, ps.get_pipeline_model_parallel_group(), ps.get_data_parallel_group())
            layer_scores = (cos[0] / cos[1].clamp(min=1)).cpu().tolist()
            order = sorted(range(L), key=lambda j: -layer_scores[j])
        else:
            order, layer_scores = _nmse_order(model, batches, full_logits, L, offset, dev)
    finally:
        model.train(was_training)

    pattern, nh, kv = m.hybrid_override_pattern, m.num_attention_heads, m.kv_channels
    hidden = sum(v for key, v in score.items() if key[0] == "hid")
    mamba_heads, mamba_head_dim = [], []
    for k in range(pattern.count("M")):
        s = score[("mamba", k)].view(m.mamba_num_heads, m.mamba_head_dim)  # [H, P]
        dim_score = s.norm(dim=0)  # [P]: L2 over heads
        top = dim_score.argsort(descending=True, stable=True)[: mamba_top_head_dim or m.mamba_head_dim]
        mamba_head_dim.append(dim_score)
        mamba_heads.append(s[:, top].norm(dim=1))  # [H]: L2 over the top channels
    attn = [score[("attn", k)].view(nh, kv).norm(dim=1) for k in range(pattern.count("*"))]  # [heads]
    ffn = [score[("ffn", k)] for k in range(pattern.count("-"))]
    return ImportanceScores(hidden, ffn, attn, mamba_head_dim, mamba_heads, order, layer_scores,
                            cfg.elastic.depth_metric)


def _register_hooks(inner, m: ModelConfig, offset: int, acc: dict, cos: Optional[torch.Tensor]) -> list:
    """Hooks that add `_stat` of each activation into acc[key]; keys use global layer indices."""
    def add(key, value):
        acc[key] = acc[key] + value if key in acc else value

    slots, hooks = layer_slots(m.hybrid_override_pattern), []
    for i, layer in enumerate(inner.decoder.layers, start=offset):
        kind, k = slots[i]
        for slot, mod, fused in _norms(layer):
            if fused:
                hooks.append(mod.register_forward_pre_hook(
                    lambda mod, a, key=("hid", i, slot): add(key, _stat(_fused_norm(mod, a[0])))))
            else:
                hooks.append(mod.register_forward_hook(lambda mod, a, out, key=("hid", i, slot): add(key, _stat(out))))
        if kind == "M":
            d = layer.mixer.d_inner_local_tp  # out[0]: [s, b, z | x | B | C | dt] of this rank
            hooks.append(layer.mixer.in_proj.register_forward_hook(
                lambda mod, a, out, key=("mamba", k), d=d: add(key, _stat(out[0][..., d:2 * d]))))
        elif kind == "*":  # linear_proj input: [s, b, heads/tp * kv]
            hooks.append(layer.self_attention.linear_proj.register_forward_pre_hook(
                lambda mod, a, key=("attn", k): add(key, _stat(a[0]))))
        else:  # linear_fc2 input: [s, b, ffn/tp]
            hooks.append(layer.mlp.linear_fc2.register_forward_pre_hook(
                lambda mod, a, key=("ffn", k): add(key, _stat(a[0]))))
        if cos is not None:
            def cos_hook(mod, args, kwargs, out, i=i):
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                y = out[0] if isinstance(out, tuple) else out
                c = F.cosine_similarity(x.float(), y.float(), dim=-1)  # [s, b]
                cos[0, i] += (1 - c).double().sum()
                cos[1, i] += c.numel()
            hooks.append(layer.register_forward_hook(cos_hook, with_kwargs=True))
    if inner.post_process:
        hooks.append(inner.decoder.final_norm.register_forward_hook(
            lambda mod, a, out: add(("hid", m.num_layers, 0), _stat(out))))
    return hooks


def _global_stats(acc: dict, m: ModelConfig, inner, offset: int, dev) -> dict[tuple, torch.Tensor]:
    """Every key's stat for the whole model (TP=1 order), on every rank: TP shards gathered on the
    stage that owns the layer, zeros on the other stages, then one sum over PP and DP."""
    tp, L = ps.get_tensor_model_parallel_world_size(), m.num_layers
    owned = range(offset, offset + len(inner.decoder.layers))
    sizes = {"mamba": m.mamba_num_heads * m.mamba_head_dim, "attn": m.num_attention_heads * m.kv_channels,
             "ffn": m.ffn_hidden_size}
    entries = []  # (key, global size, split over TP, held by this stage)
    for i, (kind, k) in enumerate(layer_slots(m.hybrid_override_pattern)):
        name = {"M": "mamba", "*": "attn", "-": "ffn"}[kind]
        here = i in owned
        entries += [(("hid", i, 0), m.hidden_size, False, here), (("hid", i, 1), m.hidden_size, False, here),
                    ((name, k), sizes[name], True, here)]
    entries.append((("hid", L, 0), m.hidden_size, False, bool(inner.post_process)))
    flat = []
    for key, size, split, here in entries:
        local = acc.get(key)
        if here and split:  # every TP rank of the stage takes part, with zeros if a hook never fired
            flat.append(_tp_gather(local.reshape(-1) if local is not None else torch.zeros(size // tp, device=dev)))
        else:
            flat.append(local.reshape(-1) if here and local is not None else torch.zeros(size, device=dev))
    flat = _all_reduce(torch.cat(flat), ps.get_pipeline_model_parallel_group(), ps.get_data_parallel_group())
    return dict(zip([e[0] for e in entries], flat.split([e[1] for e in entries])))


def _nmse_order(model, batches, full_logits: dict, L: int, offset: int, dev) -> tuple[list[int], list[float]]:
    """Iterative greedy layer removal by normalized MSE of the logits (see module docstring)."""
    groups = (ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(),
              ps.get_pipeline_model_parallel_group())
    den = torch.zeros(1, dtype=torch.float64, device=dev)
    for lg in full_logits.values():  # [b, s, V/TP], last stage only
        den += lg.double().pow(2).sum()
    _all_reduce(den, *groups)
    removed: list[int] = []
    first_round: list[float] = []
    while len(removed) < L - 1:
        candidates = [j for j in range(L) if j not in removed]
        num = torch.zeros(len(candidates), dtype=torch.float64, device=dev)
        for c, j in enumerate(candidates):
            def diff(i, lg, c=c):
                num[c] += (full_logits[i] - lg.float()).double().pow(2).sum()
            with removed_layers(model, [*removed, j], offset):
                run_forward(model, batches, diff)
        nmse = _all_reduce(num, *groups) / den
        pick = torch.tensor([int(nmse.argmin())], device=dev)
        dist.broadcast(pick, src=0)  # one decision everywhere, whatever the reduction order did
        if not removed:
            first_round = nmse.cpu().tolist()
        removed.append(candidates[int(pick)])
    survivor = next(j for j in range(L) if j not in removed)
    return [survivor, *reversed(removed)], first_round
