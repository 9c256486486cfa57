"""Zero-shot slicing: (sorted parent, subnet) -> a standalone, smaller megatron model.

The sliced model is an ordinary model of this package: its config is the parent's with the
subnet's hidden size, the dropped layers removed from the pattern, and per-layer widths
(`model.layer_*` lists) for heterogeneous axes. Its weights are the parent's, cut to the kept
rows / columns / heads, so its forward equals the parent's forward under that subnet.

Tensors here are full (TP=1) and keyed by global parameter names; `gather_full_state` and
`load_full_state` move between that view and a sharded model on any TP layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..config import ModelConfig, RunConfig, to_yaml
from ..model import sharding
from ..model.hybrid import global_name, stage_layer_offset
from ..model.weights import is_pre_norm
from ..parallel import ParallelLayout
from .model import _attn_rows, _mamba_rows
from .subnet import Subnet, layer_slots


def sliced_model_config(m: ModelConfig, s: Subnet) -> ModelConfig:
    """The standalone config of subnet `s`: kept layers only, per-layer widths where they vary."""
    slots = layer_slots(m.hybrid_override_pattern)
    kept = [i for i, keep in enumerate(s.keep) if keep]
    pattern = "".join(m.hybrid_override_pattern[i] for i in kept)
    per = lambda kind, values: [values[slots[i][1]] for i in kept if slots[i][0] == kind]  # noqa: E731
    ffn, mh, md, ah = per("-", s.ffn), per("M", s.mamba_heads), per("M", s.mamba_head_dim), per("*", s.attn_heads)
    uniform = lambda xs: len(set(xs)) <= 1  # noqa: E731
    return replace(
        m,
        hybrid_override_pattern=pattern,
        hidden_size=s.hidden,
        ffn_hidden_size=max(ffn, default=m.ffn_hidden_size),
        mamba_num_heads=max(mh, default=m.mamba_num_heads),
        mamba_head_dim=max(md, default=m.mamba_head_dim),
        num_attention_heads=max(ah, default=m.num_attention_heads),
        layer_ffn_hidden_sizes=[] if uniform(ffn) else ffn,
        layer_mamba_num_heads=[] if uniform(mh) else mh,
        layer_mamba_head_dims=[] if uniform(md) else md,
        layer_num_attention_heads=[] if uniform(ah) else ah,
    )


def ffn_kept(f: int, full: int, sort_tp: int) -> torch.Tensor:
    """Kept FFN neurons: the union of per-shard prefixes of full tensors laid out for TP `sort_tp`
    (gathered from a TP=`sort_tp` model; elastic/sorting.py deals neurons out round-robin, so these
    are the f best neurons whatever sort_tp is)."""
    shard, take = full // sort_tp, f // sort_tp
    return torch.cat([torch.arange(r * shard, r * shard + take) for r in range(sort_tp)])


def kept_indices(name: str, s: Subnet, m: ModelConfig, sort_tp: int) -> dict[int, torch.Tensor]:
    """{dim: kept indices} of parent tensor `name` (global name) under subnet `s`."""
    hk = torch.arange(s.hidden)
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
    if match is None:  # embedding, output layer, final norm: hidden columns
        return {0: hk} if name.endswith("final_norm.weight") else {1: hk}
    kind, k = layer_slots(m.hybrid_override_pattern)[int(match.group(1))]
    rest = match.group(2)
    if is_pre_norm(rest):
        return {0: hk}
    if kind == "M":
        g = m.mamba_num_groups
        rows, conv, heads, chans = _mamba_rows(m.mamba_num_heads, g, m.mamba_head_dim, m.mamba_state_dim,
                                               s.mamba_heads[k] // g, s.mamba_head_dim[k])
        return {"mixer.in_proj.weight": {0: rows, 1: hk}, "mixer.conv1d.weight": {0: conv},
                "mixer.conv1d.bias": {0: conv}, "mixer.A_log": {0: heads}, "mixer.D": {0: heads},
                "mixer.dt_bias": {0: heads}, "mixer.norm.weight": {0: chans},
                "mixer.out_proj.weight": {0: hk, 1: chans}}[rest]
    if kind == "*":
        groups, hpg = m.num_query_groups, m.num_attention_heads // m.num_query_groups
        qkv, proj = _attn_rows(groups, hpg, m.kv_channels, s.attn_heads[k] // groups)
        return {"self_attention.linear_qkv.weight": {0: qkv, 1: hk},
                "self_attention.linear_proj.weight": {0: hk, 1: proj}}[rest]
    ffn = ffn_kept(s.ffn[k], m.ffn_hidden_size, sort_tp)
    return {"mlp.linear_fc1.weight": {0: ffn, 1: hk}, "mlp.linear_fc2.weight": {0: hk, 1: ffn}}[rest]


def slice_tensor(name: str, tensor: torch.Tensor, m: ModelConfig, s: Subnet,
                 sort_tp: int = 1) -> tuple[str, torch.Tensor] | None:
    """One full parent tensor -> (its name in the sliced model, the cut tensor); None for a dropped
    layer's tensor. Layers are renumbered after dropping. `slice`, `export-hf` and `generate` all
    cut through here, one tensor at a time."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
    if match and not s.keep[int(match.group(1))]:
        return None
    for dim, idx in kept_indices(name, s, m, sort_tp).items():
        tensor = tensor.index_select(dim, idx)
    if match:
        name = f"decoder.layers.{sum(s.keep[:int(match.group(1))])}.{match.group(2)}"
    return name, tensor.contiguous()


def slice_state(full: dict[str, torch.Tensor], m: ModelConfig, s: Subnet, sort_tp: int = 1) -> dict[str, torch.Tensor]:
    """Full parent tensors -> full tensors of the sliced model."""
    cut = (slice_tensor(name, tensor, m, s, sort_tp) for name, tensor in full.items())
    return {name: t.clone() for name, t in filter(None, cut)}


def stage_parameters(model, cfg: RunConfig, layout: ParallelLayout) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(local name, global name, parameter) of this pipeline stage's parameters."""
    offset = stage_layer_offset(cfg, layout, ps.get_pipeline_model_parallel_rank())
    return [(name, global_name(name, offset), p) for name, p in model.named_parameters()]


@torch.no_grad()
def gather_full_tensor(gname: str, p: torch.Tensor, cfg: RunConfig, layout: ParallelLayout) -> torch.Tensor:
    """One parameter as its full (TP=1) fp32 CPU tensor, on every TP rank (an all_gather)."""
    if layout.tensor == 1 or sharding.split_rule(gname) is None:
        return p.detach().float().cpu().clone()
    pieces = [torch.empty_like(p) for _ in range(layout.tensor)]
    dist.all_gather(pieces, p.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return sharding.unshard(gname, [x.float().cpu() for x in pieces], cfg.model)


def gather_full_state(model, cfg: RunConfig, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """This pipeline stage's parameters as full (TP=1) tensors, on every TP rank."""
    return {gname: gather_full_tensor(gname, p, cfg, layout) for _, gname, p in stage_parameters(model, cfg, layout)}


@torch.no_grad()
def load_full_state(model, full: dict[str, torch.Tensor], cfg: RunConfig, layout: ParallelLayout) -> None:
    """Copy full tensors into this rank's shards of `model` (built from cfg on this layout)."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    for _, gname, p in stage_parameters(model, cfg, layout):
        if gname not in full:
            raise KeyError(f"no tensor for parameter '{gname}' in the sliced state")
        p.copy_(sharding.shard(gname, full[gname], tp_rank, layout.tensor, cfg.model).to(p.dtype))


def write_standalone(out_dir: str | Path, cfg: RunConfig, model, subnet: Subnet, extra: dict) -> Path:
    """A standalone sliced model: config.yaml (the sliced config), subnet.json, a dist checkpoint."""
    from ..train.checkpoint import save_checkpoint

    out = Path(out_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        (out / "subnet.json").write_text(json.dumps({"subnet": subnet.to_dict(), **extra}, indent=2))
    save_checkpoint(out / "checkpoints", 0, model, None, {"step": 0, "ffn_layout_tp": 1})
    return out
