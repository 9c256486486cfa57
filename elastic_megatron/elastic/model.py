"""The parent's forward under a subnet: compute on weight prefixes (hard) or with prefix masks (soft).

    ElasticHybrid(model, cfg)(tokens, position_ids, labels, subnet=..., gates=...)

`model` is this rank's pipeline stage of megatron's MambaModel (sorted, see elastic/sorting.py);
we run its parameters through our own layer functions instead of megatron's module forwards, so
the subnet travels as data. Shapes below are per tensor-parallel rank:

    tokens [b, s] -> embedding [s, b, h] -> x[..., :hk]                     (hidden prefix)
    (sequence parallel: the residual stream is [s/tp, b, hk], all-gathered to [s, b, hk] before
    each column-parallel projection and reduce-scattered back after each row-parallel one)
    Mamba:     in_proj rows [z | x | B | C | dt] of the kept heads / head-dim channels, B/C all
               -> conv1d (kept x channels + all B/C) -> SSD scan -> gated group RMSNorm -> out_proj
    attention: per KV group, the first a query heads + that group's K and V -> causal SDPA -> proj
    MLP:       fc1 rows[:f] -> squared ReLU -> fc2 cols[:f]
    depth:     a dropped layer is the identity

Hard mode slices, so a half-size subnet does about half the FLOPs; the projections run on views
of the parent's weights, never copies (elastic/linear.py). Soft mode runs the full width and
multiplies activations by probability-weighted prefix masks (router training); with 0/1 masks it
gives the hard result. RMSNorm over a masked hidden normalises over the kept channels only, as the
sliced model does (elastic/masked_norm.py). Gates (straight-through, value 1) carry the router's
gradient into each layer output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from ..config import RunConfig
from ..model.hybrid import squared_relu, stage_layer_offset
from ..model.recompute import layer_call
from ..model.weights import pre_norm_weight
from ..parallel import ParallelLayout
from .linear import index_runs, kept_rows, sliced_linear
from .masked_norm import masked_rms_norm
from .subnet import Subnet, layer_slots


@dataclass
class SoftMasks:
    """Soft mode: full-width masks in [0, 1] (global, TP=1 indexing), probability-weighted prefixes."""

    hidden: torch.Tensor  # [h]
    mamba_heads: list[torch.Tensor]  # per Mamba layer [H] (per-group prefixes, group-major)
    mamba_head_dim: list[torch.Tensor]  # per Mamba layer [p]
    attn_heads: list[torch.Tensor]  # per attention layer [heads] (per-KV-group prefixes)
    ffn: list[torch.Tensor]  # per MLP layer [ffn]
    keep: torch.Tensor  # [L] keep probability per layer

    @classmethod
    def of(cls, sm: dict) -> "SoftMasks":
        """From `RouterSet.soft_masks`' dict (an axis whose layer type the pattern lacks is absent)."""
        return cls(hidden=sm["hidden"], mamba_heads=list(sm.get("mamba_heads", [])),
                   mamba_head_dim=list(sm.get("mamba_head_dim", [])), attn_heads=list(sm.get("attn_heads", [])),
                   ffn=list(sm.get("ffn", [])), keep=sm["depth"])

    def to(self, dtype: torch.dtype) -> "SoftMasks":
        """In the activations' dtype (bf16 training): an fp32 mask would promote every masked
        activation to fp32. Differentiable, so the router still gets its gradient."""
        c = lambda t: t.to(dtype)  # noqa: E731
        return SoftMasks(c(self.hidden), [c(t) for t in self.mamba_heads], [c(t) for t in self.mamba_head_dim],
                         [c(t) for t in self.attn_heads], [c(t) for t in self.ffn], c(self.keep))


# ----------------------------------------------------------------------------- index helpers

@lru_cache(maxsize=512)
def _mamba_rows(heads_l: int, groups_l: int, p: int, n: int, a_per_group: int, d: int,
                device: Optional[torch.device] = None):
    """Local in_proj rows, conv channels and head ids kept by (a heads per group, d channels per head),
    made once per device: the layer loop never copies an index from the host."""
    hpg = heads_l // groups_l
    heads = torch.tensor([g * hpg + j for g in range(groups_l) for j in range(a_per_group)], device=device)
    chans = (heads[:, None] * p + torch.arange(d, device=device)[None, :]).reshape(-1)  # kept channels of d_inner
    d_in, bc = heads_l * p, groups_l * n
    bc_rows = torch.arange(2 * bc, device=device)
    rows = torch.cat([chans, d_in + chans, 2 * d_in + bc_rows, 2 * d_in + 2 * bc + heads])
    conv = torch.cat([chans, d_in + bc_rows])
    return rows, conv, heads, chans


@lru_cache(maxsize=512)
def _attn_rows(groups_l: int, hpg: int, d: int, a_per_group: int):
    """Local linear_qkv rows ([q_0..q_a-1, k, v] per group) and linear_proj columns of kept heads."""
    qkv, proj = [], []
    for g in range(groups_l):
        base = g * (hpg + 2) * d
        qkv += [base + j * d + c for j in range(a_per_group) for c in range(d)]
        qkv += [base + hpg * d + c for c in range(2 * d)]  # K and V of the group
        proj += [(g * hpg + j) * d + c for j in range(a_per_group) for c in range(d)]
    return torch.tensor(qkv), torch.tensor(proj)


@lru_cache(maxsize=512)
def _mamba_runs(heads_l: int, groups_l: int, p: int, n: int, a_per_group: int, d: int):
    """`_mamba_rows`' in_proj rows and out_proj columns as contiguous runs (see linear.py)."""
    rows, _, _, chans = _mamba_rows(heads_l, groups_l, p, n, a_per_group, d)
    return index_runs(rows), index_runs(chans)


@lru_cache(maxsize=512)
def _attn_runs(groups_l: int, hpg: int, d: int, a_per_group: int):
    """`_attn_rows`' linear_qkv rows and linear_proj columns as contiguous runs (see linear.py)."""
    qkv, proj = _attn_rows(groups_l, hpg, d, a_per_group)
    return index_runs(qkv), index_runs(proj)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dim; with `mask`, over the kept channels only (k/d correction, fp32
    statistics, output masked too: elastic/masked_norm.py)."""
    if mask is None:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return masked_rms_norm(x, weight, mask, eps)


def group_rms_norm(y: torch.Tensor, weight: torch.Tensor, groups: int, eps: float,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mamba's gated-output norm: RMSNorm inside each of `groups` contiguous channel groups."""
    if mask is not None:  # over each group's kept channels, fp32 statistics (the mask is applied later)
        return masked_rms_norm(y, weight, mask, eps, groups, mask_output=False)
    shape = y.shape
    yg = y.reshape(*shape[:-1], groups, shape[-1] // groups)
    out = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + eps)
    return out.reshape(shape) * weight


# ----------------------------------------------------------------------------- the forward

class ElasticHybrid:
    """A view of a (sorted) MambaModel stage that runs any subnet. Holds no weights of its own."""

    def __init__(self, model, cfg: RunConfig, layout: ParallelLayout):
        self.model, self.m = model, cfg.model
        self.tp = layout.tensor
        self.offset = stage_layer_offset(cfg, layout, ps.get_pipeline_model_parallel_rank())
        self.slots = layer_slots(cfg.model.hybrid_override_pattern)
        self.full = Subnet.full(cfg.model)
        self.recompute = cfg.train.recompute
        # megatron's sequence parallelism, as the model was built (its embedding then reduce-scatters)
        self.sp = bool(model.config.sequence_parallel) and self.tp > 1
        if self.sp:  # a norm sees part of the sequence: finalize_model_grads must sum its gradient over TP
            norms = [pre_norm_weight(layer, self.slots[self.offset + i][0]) for i, layer in enumerate(model.decoder.layers)]
            norms += [model.decoder.final_norm.weight] if model.post_process else []
            if not all(getattr(w, "sequence_parallel", False) for w in norms):
                raise RuntimeError("sequence parallelism: a norm weight is not marked `sequence_parallel`, so its "
                                   "gradient would not be summed over the TP ranks; build the model with "
                                   "model/spec.py's specs")

    def __call__(self, tokens, position_ids, labels=None, subnet: Optional[Subnet] = None,
                 gates: Optional[torch.Tensor] = None, masks: Optional[SoftMasks] = None,
                 collect: Optional[dict] = None, hidden_in: Optional[torch.Tensor] = None):
        """`collect`: {global layer index: None}; filled with the residual stream after each of those
        layers ([s, b, hk]; a dropped layer passes its input on), for intermediate-layer distillation.
        `hidden_in`: this stage's input [s, b, h] on a later pipeline stage (default: the tensor
        megatron's schedule set on the decoder)."""
        model, s = self.model, subnet or self.full
        soft = masks is not None
        hk = self.m.hidden_size if soft else s.hidden
        if model.pre_process:
            x = model.embedding.word_embeddings(tokens)  # [b, s, h]; sequence parallel: [s/tp, b, h]
            x = x if self.sp else x.transpose(0, 1)  # [s, b, h]
        else:  # [s, b, h] from the previous stage (padded, see below)
            x = hidden_in if hidden_in is not None else model.decoder.input_tensor
        if soft:
            masks = masks.to(x.dtype)
        if self.sp:  # applied to this rank's part of the sequence only: their gradients summed over TP
            if soft:
                masks = replace(masks, hidden=self._tp_mask(masks.hidden), keep=self._tp_mask(masks.keep))
            if gates is not None:
                gates = self._tp_mask(gates)
        if not soft:
            x = x[..., :hk]
        elif model.pre_process:  # a later stage receives a residual stream that is masked already
            x = x * masks.hidden
        for i, layer in enumerate(model.decoder.layers):
            gi = self.offset + i
            if not soft and not s.keep[gi]:
                if collect is not None and gi in collect:
                    collect[gi] = self._whole_sequence(x)
                continue  # a dropped layer is the identity
            gate = gates[gi] if gates is not None else None
            # train.recompute=full: only x is kept for the backward, the layer is recomputed there
            x = x + layer_call(self.recompute, self._layer, layer, gi, x, s, masks, gate)
            if collect is not None and gi in collect:
                collect[gi] = self._whole_sequence(x)
        if not model.post_process:
            # p2p buffers have the parent's width: pad a narrower hidden with zeros.
            return F.pad(x, (0, self.m.hidden_size - x.shape[-1])) if x.shape[-1] < self.m.hidden_size else x
        hmask = masks.hidden if soft else None
        x = rms_norm(x, kept_rows(model.decoder.final_norm.weight, hk), self.m.norm_epsilon, hmask)
        logits = sliced_linear(self._enter(x), model.output_layer.weight, cols=hk)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [b, s, V/tp]
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()  # [b, s]

    # -- layers: each returns the layer's residual update [s, b, hk] -----------------------

    def _layer(self, layer, gi: int, x, s: Subnet, masks: Optional[SoftMasks], gate):
        """Layer gi's residual update, scaled by its soft keep probability and its gate."""
        kind, k = self.slots[gi]
        fn = {"M": self._mamba, "*": self._attention, "-": self._mlp}[kind]
        out = fn(layer, x, s, k, masks)
        if masks is not None:  # one product with the [h] scale: autograd keeps `out` once, not three times
            scale = masks.hidden * masks.keep[gi]
            return out * (scale * gate if gate is not None else scale)
        return out * gate if gate is not None else out

    def _enter(self, h: torch.Tensor) -> torch.Tensor:
        """Into a column-parallel projection: the whole sequence on every TP rank ([s/tp, b, k] all-
        gathered under sequence parallelism, its gradient reduce-scattered; else the replicated
        stream, its gradient all-reduced)."""
        if self.sp:
            return gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
        return copy_to_tensor_model_parallel_region(h)

    def _leave(self, y: torch.Tensor) -> torch.Tensor:
        """Out of a row-parallel projection: the ranks' partial sums added (reduce-scattered to each
        rank's part of the sequence under sequence parallelism; else all-reduced)."""
        if self.sp:
            return reduce_scatter_to_sequence_parallel_region(y)
        return reduce_from_tensor_model_parallel_region(y)

    def _whole_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """A residual stream for a loss that every TP rank computes whole (intermediate-layer
        distillation): all-gathered under sequence parallelism, each rank's gradient its own part."""
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False) if self.sp else x

    def _tp_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A soft mask that a TP rank uses only in part (its heads, its FFN rows): identity forward,
        gradient summed over the TP ranks backward, so every rank holds the whole mask's gradient
        (the replicated router is then averaged over TP like the gates of hard mode)."""
        return copy_to_tensor_model_parallel_region(mask) if self.tp > 1 else mask

    def _norm(self, layer, kind: str, x, masks):
        """The layer's pre-norm on the kept hidden channels (its weight wherever the spec keeps it)."""
        hk = x.shape[-1]
        w = pre_norm_weight(layer, kind)
        return rms_norm(x, kept_rows(w, hk), self.m.norm_epsilon, masks.hidden if masks else None)

    def _mamba(self, layer, x, s: Subnet, k: int, masks: Optional[SoftMasks]):
        mixer, m = layer.mixer, self.m
        heads_l, groups_l, p, n = m.mamba_num_heads // self.tp, m.mamba_num_groups // self.tp, m.mamba_head_dim, \
            m.mamba_state_dim
        hk = x.shape[-1]
        h = self._enter(self._norm(layer, "M", x, masks))  # [s, b, hk]
        if masks is None:
            a, d = s.mamba_heads[k] // m.mamba_num_groups, s.mamba_head_dim[k]
        else:
            a, d = heads_l // groups_l, p  # full width, masked below
        _, conv_idx, kept_heads, chans = _mamba_rows(heads_l, groups_l, p, n, a, d, x.device)
        row_runs, chan_runs = _mamba_runs(heads_l, groups_l, p, n, a, d)
        zxbcdt = sliced_linear(h, mixer.in_proj.weight, rows=row_runs, cols=hk)  # [s, b, *]
        d_in = kept_heads.numel() * d
        A = -torch.exp(kept_rows(mixer.A_log, kept_heads).float())
        conv_w = kept_rows(mixer.conv1d.weight, conv_idx).squeeze(1)  # [c, w]
        conv_b = kept_rows(mixer.conv1d.bias, conv_idx)
        z, xbc, dt = torch.split(zxbcdt.transpose(0, 1), [d_in, d_in + 2 * groups_l * n, kept_heads.numel()], dim=-1)
        xbc = F.silu(_causal_conv(xbc, conv_w, conv_b))  # [b, s, c]
        xs, B, C = torch.split(xbc, [d_in, groups_l * n, groups_l * n], dim=-1)
        chan_mask = None
        if masks is not None:  # [H*p] mask of this rank's channels: head mask x head-dim mask
            r = ps.get_tensor_model_parallel_rank()
            hm = self._tp_mask(masks.mamba_heads[k]).view(-1)[r * heads_l:(r + 1) * heads_l]
            chan_mask = (hm[:, None] * self._tp_mask(masks.mamba_head_dim[k])[None, :]).reshape(-1)
            xs = xs * chan_mask
        b_, s_ = xs.shape[:2]
        y = _mixer_ops().mamba_chunk_scan_combined(
            xs.reshape(b_, s_, -1, d), dt, A, B.reshape(b_, s_, groups_l, n), C.reshape(b_, s_, groups_l, n),
            mixer.chunk_size, D=kept_rows(mixer.D, kept_heads), z=z.reshape(b_, s_, -1, d),
            dt_bias=kept_rows(mixer.dt_bias, kept_heads).float(), dt_softplus=True,
        ).reshape(b_, s_, d_in)
        y = group_rms_norm(y, kept_rows(mixer.norm.weight, chans), groups_l, 1e-5, chan_mask)
        y = sliced_linear(y.transpose(0, 1), mixer.out_proj.weight, rows=hk, cols=chan_runs)
        return self._leave(y)

    def _attention(self, layer, x, s: Subnet, k: int, masks: Optional[SoftMasks]):
        m, att = self.m, layer.self_attention
        groups_l, hpg, d = m.num_query_groups // self.tp, m.num_attention_heads // m.num_query_groups, m.kv_channels
        a = hpg if masks is not None else s.attn_heads[k] // m.num_query_groups
        hk = x.shape[-1]
        h = self._enter(self._norm(layer, "*", x, masks))
        qkv_rows, proj_cols = _attn_runs(groups_l, hpg, d, a)
        qkv = sliced_linear(h, att.linear_qkv.weight, rows=qkv_rows, cols=hk)  # [s, b, G*(a+2)*d]
        sq, b_ = qkv.shape[:2]
        qkv = qkv.view(sq, b_, groups_l, a + 2, d)
        q = qkv[:, :, :, :a].reshape(sq, b_, groups_l * a, d).permute(1, 2, 0, 3)  # [b, G*a, s, d]
        kk = qkv[:, :, :, a].permute(1, 2, 0, 3)  # [b, G, s, d]
        v = qkv[:, :, :, a + 1].permute(1, 2, 0, 3)
        kk, v = kk.repeat_interleave(a, dim=1), v.repeat_interleave(a, dim=1)
        ctx = F.scaled_dot_product_attention(q, kk, v, is_causal=True)  # [b, G*a, s, d]
        if masks is not None:
            r = ps.get_tensor_model_parallel_rank()
            hmask = self._tp_mask(masks.attn_heads[k])[r * groups_l * hpg:(r + 1) * groups_l * hpg]
            ctx = ctx * hmask[None, :, None, None]
        ctx = ctx.permute(2, 0, 1, 3).reshape(sq, b_, -1)  # [s, b, G*a*d]
        out = sliced_linear(ctx, att.linear_proj.weight, rows=hk, cols=proj_cols)
        return self._leave(out)

    def _mlp(self, layer, x, s: Subnet, k: int, masks: Optional[SoftMasks]):
        mlp, hk = layer.mlp, x.shape[-1]
        f = None if masks is not None else s.ffn[k] // self.tp
        h = self._enter(self._norm(layer, "-", x, masks))
        inter = squared_relu(sliced_linear(h, mlp.linear_fc1.weight, rows=f, cols=hk))
        if masks is not None:
            # Under TP the sorted FFN is dealt out round-robin (elastic/sorting.py ffn_layout): row i
            # of shard r is the neuron of importance rank i * tp + r, so the mask (by rank) is strided
            inter = inter * self._tp_mask(masks.ffn[k])[ps.get_tensor_model_parallel_rank()::self.tp]
        out = sliced_linear(inter, mlp.linear_fc2.weight, rows=hk, cols=f)
        return self._leave(out)


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv over the sequence: x [b, s, c], weight [c, w] -> [b, s, c]."""
    w = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (w - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[-1])
    return out.transpose(1, 2)


def _mixer_ops():
    """megatron's mamba_mixer module: its scan is mamba-ssm's triton kernel on GPU, ours on CPU."""
    import megatron.core.ssm.mamba_mixer as mixer

    return mixer

