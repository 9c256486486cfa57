"""Sort the parent by importance so that every subnet is a prefix (elastic/subnet.py), in place.

`sort_parent` permutes this rank's megatron weights without changing the parent's function:

    hidden          one permutation model-wide: embedding and output_layer columns, every norm
                    weight, the hidden input columns of in_proj / linear_qkv / linear_fc1 and the
                    hidden output rows of out_proj / linear_proj / linear_fc2 (RMSNorm and the
                    residual stream are permutation-equivariant)
    ffn[k]          linear_fc1 rows and linear_fc2 columns of MLP layer k
    attn[k]         query heads *within each KV group*: the q rows of every [q.., k, v] group block
                    of linear_qkv and the head column blocks of linear_proj; K/V untouched
    mamba_heads[k]  heads *within each Mamba group*: z, x and dt rows of in_proj, conv1d x
                    channels, A_log, D, dt_bias, mixer.norm.weight, out_proj columns
    mamba_head_dim  one channel permutation applied inside every head (z, x, conv x, norm weight,
                    out_proj columns). B/C rows and conv B/C channels are never touched.

Why the function is unchanged for Mamba: head h reads B/C group h // (H / G), and the gated
RMSNorm normalises each contiguous block of d_inner / G channels (= one group's heads). A head
permutation inside a group plus a head-dim permutation keeps every channel in its group's block,
and the SSM treats each (head, channel) independently.

Tensor parallelism. Every TP shard keeps the same number of channels for any budget: a subnet
takes the same prefix on each shard and the kept set is the union of per-shard prefixes. Mamba
groups and KV groups lie entirely inside one shard (groups are divisible by TP, checked by
ParallelLayout), so sorting within groups is shard-local by itself; hidden and head-dim are
replicated over TP. FFN neurons are ranked globally and dealt out to the TP shards round-robin
(`ffn_layout`): under TP t, shard r holds the neurons ranked r, r + t, r + 2t, ... in that order.
The per-shard prefixes of f / t neurons are then the f best neurons overall, whatever t is, so a
subnet means the same neurons under every TP size and a sorted checkpoint written under one TP size
is re-laid for another by an exact permutation (`relay_ffn`), never re-sorted. Dealing out crosses
shards, so sorting and re-laying all-gather one MLP weight at a time over the TP group.

Sort before megatron DDP / the optimizer are built: optimizer state is not permuted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..config import ConfigError, ModelConfig
from ..model.weights import is_pre_norm
from ..parallel import ParallelLayout
from .importance import ImportanceScores, _stage_offset, _unwrap
from .subnet import layer_slots


def ranking(scores: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """Descending order inside each of `blocks` equal contiguous blocks: perm[i] = old index at
    new position i, and perm never leaves its block. Ties keep the original order."""
    n = scores.numel()
    if n % blocks:
        raise ValueError(f"{n} scores do not split into {blocks} equal blocks")
    per = scores.detach().float().cpu().view(blocks, n // blocks)
    order = per.argsort(dim=1, descending=True, stable=True)
    return (order + torch.arange(blocks)[:, None] * (n // blocks)).reshape(-1)


@dataclass
class SortPlan:
    """Global (TP=1) permutations: new position i holds old index perm[i]."""

    hidden: torch.Tensor  # [h]
    ffn: list[torch.Tensor]  # per MLP layer [ffn]
    attn: list[torch.Tensor]  # per attention layer [heads], within KV groups
    mamba_heads: list[torch.Tensor]  # per Mamba layer [H], within Mamba groups
    mamba_head_dim: list[torch.Tensor]  # per Mamba layer [P]

    def permute_scores(self, s: ImportanceScores) -> ImportanceScores:
        """The scores of the sorted parent (what estimate_importance would measure on it)."""
        take = lambda vs, ps_: [v[p] for v, p in zip(vs, ps_, strict=True)]  # noqa: E731
        return replace(s, hidden=s.hidden[self.hidden], ffn=take(s.ffn, self.ffn), attn=take(s.attn, self.attn),
                       mamba_heads=take(s.mamba_heads, self.mamba_heads),
                       mamba_head_dim=take(s.mamba_head_dim, self.mamba_head_dim))


def sort_plan(scores: ImportanceScores, m: ModelConfig) -> SortPlan:
    return SortPlan(
        hidden=ranking(scores.hidden),
        ffn=[ranking(s) for s in scores.ffn],
        attn=[ranking(s, m.num_query_groups) for s in scores.attn],
        mamba_heads=[ranking(s, m.mamba_num_groups) for s in scores.mamba_heads],
        mamba_head_dim=[ranking(s) for s in scores.mamba_head_dim],
    )


def ffn_layout(n: int, tp: int) -> torch.Tensor:
    """Importance rank of the neuron at each global FFN position under TP `tp`: position
    r * (n / tp) + i (row i of shard r) holds rank i * tp + r. ffn_layout(n, 1) is the identity."""
    if n % tp:
        raise ValueError(f"{n} FFN neurons do not split over TP {tp}")
    p = torch.arange(n)
    return (p % (n // tp)) * tp + p // (n // tp)


def ffn_relay_index(n: int, from_tp: int, to_tp: int) -> torch.Tensor:
    """src[p]: the global FFN position, in the layout of TP `from_tp`, of the neuron that position p
    holds in the layout of TP `to_tp` (new = old.index_select(dim, src))."""
    return ffn_layout(n, from_tp).argsort()[ffn_layout(n, to_tp)]


def _local(perm: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This TP rank's part of a global permutation, in local indices."""
    n = perm.numel() // tp
    seg = perm[rank * n:(rank + 1) * n] - rank * n
    if seg.numel() and (seg.min() < 0 or seg.max() >= n):
        raise ValueError("permutation crosses a tensor-parallel shard")
    return seg


def _param_ops(name: str, shape: torch.Size, plan: SortPlan, m: ModelConfig, offset: int, rank: int, tp: int):
    """[(dim, local index)] to apply to parameter `name` (this stage's local name) of this TP rank."""
    hid = plan.hidden
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [(1, hid)]
    if name == "decoder.final_norm.weight":
        return [(0, hid)]
    mt = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if mt is None:
        raise KeyError(f"sorting: no rule for parameter '{name}'; add one to elastic/sorting.py")
    rest = mt.group(2)
    kind, k = layer_slots(m.hybrid_override_pattern)[offset + int(mt.group(1))]
    if is_pre_norm(rest):  # either spec (model/weights.py)
        return [(0, hid)]
    ar = torch.arange
    if kind == "M":
        P = m.mamba_head_dim
        d, bc = m.mamba_num_heads * P // tp, m.mamba_num_groups * m.mamba_state_dim // tp
        hp = _local(plan.mamba_heads[k], rank, tp)  # [H/tp]
        ch = (hp[:, None] * P + plan.mamba_head_dim[k][None, :]).reshape(-1)  # [d_inner/tp] x channels
        rules = {
            "mixer.in_proj.weight": [(0, torch.cat([ch, d + ch, 2 * d + ar(2 * bc), 2 * d + 2 * bc + hp])), (1, hid)],
            "mixer.conv1d.weight": [(0, torch.cat([ch, d + ar(2 * bc)]))],
            "mixer.conv1d.bias": [(0, torch.cat([ch, d + ar(2 * bc)]))],
            "mixer.A_log": [(0, hp)],
            "mixer.dt_bias": [(0, hp)],
            "mixer.D": [(0, hp if shape[0] == hp.numel() else ch)],  # per head, or per channel (D_has_hdim)
            "mixer.norm.weight": [(0, ch)],
            "mixer.out_proj.weight": [(0, hid), (1, ch)],
        }
    elif kind == "*":
        q, kv, g = m.num_attention_heads // m.num_query_groups, m.kv_channels, m.num_query_groups // tp
        ap = _local(plan.attn[k], rank, tp)  # [heads/tp], group-major
        qkv = []
        for gi in range(g):  # group block [q_0 .. q_{q-1}, k, v], each kv rows
            base, heads = gi * (q + 2) * kv, ap[gi * q:(gi + 1) * q] - gi * q
            qkv += [base + (heads[:, None] * kv + ar(kv)).reshape(-1), base + q * kv + ar(2 * kv)]
        rules = {
            "self_attention.linear_qkv.weight": [(0, torch.cat(qkv)), (1, hid)],
            "self_attention.linear_proj.weight": [(0, hid), (1, (ap[:, None] * kv + ar(kv)).reshape(-1))],
        }
    else:  # global source neurons of this shard's positions (crosses shards: see _apply)
        n = m.ffn_hidden_size
        fp = _Global(plan.ffn[k][ffn_layout(n, tp)][rank * n // tp:(rank + 1) * n // tp])
        rules = {"mlp.linear_fc1.weight": [(0, fp), (1, hid)], "mlp.linear_fc2.weight": [(0, hid), (1, fp)]}
    if rest not in rules:
        raise KeyError(f"sorting: no rule for parameter '{name}' of a '{kind}' layer; add one to elastic/sorting.py")
    return rules[rest]


@dataclass
class _Global:
    """Indices into the TP-gathered (full) tensor along a dim, not into this rank's shard."""

    index: torch.Tensor


def _tp_gather(t: torch.Tensor, dim: int, tp: int) -> torch.Tensor:
    """The full tensor along `dim` from every TP rank's shard (on the tensor's device)."""
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _apply(p: torch.Tensor, dim: int, idx, tp: int) -> None:
    if isinstance(idx, _Global):
        p.copy_(_tp_gather(p, dim, tp).index_select(dim, idx.index.to(p.device)))
    else:
        p.copy_(p.index_select(dim, idx.to(p.device)))


@torch.no_grad()
def sort_parent(model: torch.nn.Module, scores: ImportanceScores, m: ModelConfig, layout: ParallelLayout) -> SortPlan:
    """Permute this rank's weights in place so every budget is a prefix; returns the global plan."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    plan = sort_plan(scores, m)
    offset = _stage_offset(m, layout)
    for name, p in _unwrap(model).named_parameters():
        for dim, idx in _param_ops(name, p.shape, plan, m, offset, rank, tp):
            _apply(p.data, dim, idx, tp)
    return plan


@torch.no_grad()
def relay_ffn(model: torch.nn.Module, from_tp: int) -> bool:
    """Re-lay the FFN neurons of a sorted parent loaded from a checkpoint written under TP `from_tp`
    for this run's TP size (an exact permutation of each MLP's neurons: the function is unchanged
    and every subnet keeps the same neurons). Returns whether anything moved."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if from_tp == tp:
        return False
    for name, p in _unwrap(model).named_parameters():
        dim = 0 if name.endswith("mlp.linear_fc1.weight") else 1 if name.endswith("mlp.linear_fc2.weight") else None
        if dim is None:
            continue
        n = p.shape[dim] * tp  # this layer's width (per-layer in a sliced model)
        if n % from_tp:
            raise ConfigError(f"config key 'elastic.sort_tensor_parallel': the checkpoint's FFN layout (TP {from_tp}) "
                              f"does not divide the {n} neurons of '{name}'; is this the right checkpoint?")
        _apply(p.data, dim, _Global(ffn_relay_index(n, from_tp, tp)[rank * n // tp:(rank + 1) * n // tp]), tp)
    return True


def load_parent(path, model: torch.nn.Module, cfg, layout: ParallelLayout, optimizer=None) -> dict:
    """load_checkpoint, then lay a sorted parent's FFN out for this run's TP size. The checkpoint's
    own layout is the `ffn_layout_tp` its loop state records (every checkpoint of a sorted model
    written by this package does), else `elastic.sort_tensor_parallel`; 0 = not sorted, nothing to
    re-lay. Resuming (an optimizer given) needs the TP size the state was written under, because
    the optimizer's moments are not re-laid."""
    from ..train.checkpoint import load_checkpoint

    loop = load_checkpoint(path, model, optimizer)
    from_tp = int(loop.get("ffn_layout_tp") or cfg.elastic.sort_tensor_parallel or layout.tensor)
    if from_tp != layout.tensor and optimizer is not None:
        raise ConfigError(f"config key 'parallel.tensor': {path} was written under TP {from_tp} and its optimizer "
                          f"state is laid out for it; resume with parallel.tensor={from_tp}, or start a new run "
                          f"from it (checkpoint.load={path} in a fresh logging.out_dir)")
    relay_ffn(model, from_tp)
    return loop
