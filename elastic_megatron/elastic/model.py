"""The parent's forward under a subnet: compute on weight prefixes (hard) or with prefix masks (soft).

    ElasticHybrid(model, cfg)(tokens, position_ids, labels, subnet=..., gates=...)

`model` is this rank's pipeline stage of megatron's MambaModel (sorted, see elastic/sorting.py);
we run its parameters through our own layer functions instead of megatron's module forwards, so
the subnet travels as data. Shapes below are per tensor-parallel rank:

    tokens [b, s] -> embedding [s, b, h] -> x[..., :hk]                     (hidden prefix)
    Mamba:     in_proj rows [z | x | B | C | dt] of the kept heads / head-dim channels, B/C all
               -> conv1d (kept x channels + all B/C) -> SSD scan -> gated group RMSNorm -> out_proj
    attention: per KV group, the first a query heads + that group's K and V -> causal SDPA -> proj
    MLP:       fc1 rows[:f] -> squared ReLU -> fc2 cols[:f]
    depth:     a dropped layer is the identity

Hard mode (default) slices, so a half-size subnet does about half the FLOPs. The linear layers
(`_linear`) do not copy the kept part of a weight (fp32): the kept rows / columns form a few
contiguous runs (per B/C or KV group), each run is one GEMM on a strided view of the parent weight,
and the backward writes each run's weight gradient straight into the kept part of the gradient
buffer (megatron DDP's `main_grad` in training, else `.grad`). In bf16 the runs of a summed-over
dim are concatenated first, so the rounding is that of one GEMM. Soft mode runs the full width and
multiplies activations by probability-weighted prefix masks (router training); with 0/1 masks it
gives the hard result. RMSNorm over a masked hidden uses the k/d correction
(eps x k/d, output x sqrt(k/d)), i.e. it normalises over the kept channels only, as the sliced
model does. Gates (straight-through, value 1) carry the router's gradient into each layer output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

from ..config import RunConfig
from ..model.hybrid import squared_relu, stage_layer_offset
from ..model.recompute import layer_call
from ..model.weights import pre_norm_weight
from ..parallel import ParallelLayout
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


def _index_runs(idx: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """An index tensor as maximal runs of consecutive indices: ((start, length), ...), in order."""
    runs: list[list[int]] = []
    for i in idx.tolist():
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return tuple((a, n) for a, n in runs)


@lru_cache(maxsize=512)
def _mamba_runs(heads_l: int, groups_l: int, p: int, n: int, a_per_group: int, d: int):
    """`_mamba_rows`' in_proj rows and out_proj columns as contiguous runs (see `_linear`)."""
    rows, _, _, chans = _mamba_rows(heads_l, groups_l, p, n, a_per_group, d)
    return _index_runs(rows), _index_runs(chans)


@lru_cache(maxsize=512)
def _attn_runs(groups_l: int, hpg: int, d: int, a_per_group: int):
    """`_attn_rows`' linear_qkv rows and linear_proj columns as contiguous runs (see `_linear`)."""
    qkv, proj = _attn_rows(groups_l, hpg, d, a_per_group)
    return _index_runs(qkv), _index_runs(proj)


def _select_rows(t: torch.Tensor, rows) -> torch.Tensor:
    """t[:rows] for a prefix length, t[rows] for an index tensor."""
    return t.narrow(0, 0, rows) if isinstance(rows, int) else t.index_select(0, rows.to(t.device))


class _SubWeight(torch.autograd.Function):
    """w[rows] (a small weight: norm, conv, A_log, D, dt_bias) whose backward adds the gradient into
    the kept rows of the weight's gradient buffer (megatron DDP's `main_grad`, else `.grad`) instead
    of returning a zero-filled parent-sized gradient. The projections go through `_linear`."""

    @staticmethod
    def forward(ctx, w, rows):
        ctx.save_for_backward(w)
        ctx.rows = rows
        return _select_rows(w, rows).contiguous()

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        buf = getattr(w, "main_grad", None)
        if buf is None:
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            buf = w.grad
        rows = ctx.rows
        if isinstance(rows, int):
            buf.narrow(0, 0, rows).add_(g.to(buf.dtype))
        else:
            buf.index_add_(0, rows.to(buf.device), g.to(buf.dtype))
        return None, None


def _sub(w: torch.Tensor, rows) -> torch.Tensor:
    """The kept rows of a weight (a prefix length, or an index tensor of distinct ascending rows as
    the helpers above make them); `w` itself when all are kept. Decided from sizes alone: comparing
    the indices would be a host sync in every layer."""
    n = w.shape[0]
    if (rows if isinstance(rows, int) else rows.numel()) == n:
        return w
    if not (w.requires_grad and torch.is_grad_enabled()):
        return _select_rows(w, rows)
    return _SubWeight.apply(w, rows)


def _as_runs(sel, size: int) -> tuple[tuple[int, int], ...]:
    """None (all) | prefix length | runs -> runs."""
    if sel is None:
        return ((0, size),)
    if isinstance(sel, int):
        return ((0, sel),)
    return tuple(sel)


def _complement(runs, size: int) -> list[tuple[int, int]]:
    """The runs of [0, size) not covered by `runs`."""
    out, pos = [], 0
    for a, n in sorted(runs):
        if a > pos:
            out.append((pos, a - pos))
        pos = max(pos, a + n)
    if pos < size:
        out.append((pos, size - pos))
    return out


def _mm_runs(a: torch.Tensor, a_runs, w_blocks, out: torch.Tensor) -> None:
    """out = sum_j a[:, j-th run] @ w_blocks[j]: a product whose K dim is cut into runs. In fp32 / fp64,
    one GEMM per run accumulating into `out` (views only); in lower precision the weight blocks are
    concatenated first, so the sum is one GEMM with one rounding of the result, as in F.linear."""
    if len(w_blocks) == 1:
        torch.mm(a, w_blocks[0], out=out)
    elif a.dtype not in (torch.float32, torch.float64):
        torch.mm(a, torch.cat(w_blocks, dim=0), out=out)
    else:
        i = 0
        for j, ((_, n), wb) in enumerate(zip(a_runs, w_blocks)):
            if j == 0:
                torch.mm(a[:, i:i + n], wb, out=out)
            else:
                out.addmm_(a[:, i:i + n], wb)
            i += n


def _plain_ops():
    """Context for the run-by-run GEMM loops below: they issue many small torch calls (views, mm)
    and create no tensor on any device, so they skip `__torch_function__` handling, in particular
    the CPU compat mode of compat/cpu.py (installed only without CUDA), which costs several us per
    call -- more than a small view or GEMM call itself. Results are unchanged."""
    return torch._C.DisableTorchFunction()


def _linear_fwd(x: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, rows, cols) -> torch.Tensor:
    """x [..., k] (x2: the same as [N, k]) @ w[rows][:, cols].T on views of the parent weight `w`: each
    row run writes its own output columns (one GEMM per column run of w, see `_mm_runs`). Returns a
    new [..., n_out] tensor, not a view (autograd may see it modified in place)."""
    n_out = sum(n for _, n in rows)
    with _plain_ops():
        res = x2.new_empty(*x.shape[:-1], n_out)
        out, o = res.view(-1, n_out), 0
        for r0, rn in rows:
            _mm_runs(x2, cols, [w[r0:r0 + rn, c0:c0 + cn].t() for c0, cn in cols], out[:, o:o + rn])
            o += rn
    return res


class _ElasticLinear(torch.autograd.Function):
    """F.linear(x, w[rows][:, cols]) on views of the parent weight `w`, rows / cols being runs of
    contiguous indices ((start, length), ...). Nothing is gathered in fp32: the forward runs one GEMM
    per (row run, col run) on strided views of `w` (BLAS takes the row stride as leading dimension),
    and the backward writes the weight gradient of each block straight into the kept part of the
    weight's gradient buffer (megatron DDP's `main_grad`, else `.grad`) with one accumulating GEMM,
    so no sliced-weight copy, temporary gradient or index scatter exists. A new `.grad` is allocated
    uninitialised and only the part outside the kept blocks is zeroed. The weight's own autograd edge
    gets None (as with `_SubWeight`: megatron DDP's per-parameter hook then has nothing to add)."""

    @staticmethod
    def forward(ctx, x, w, rows, cols):
        x2 = x.reshape(-1, x.shape[-1])  # a copy only when x is not viewable (as in F.linear)
        ctx.save_for_backward(x2, w)
        ctx.rows, ctx.cols, ctx.x_shape = rows, cols, x.shape
        return _linear_fwd(x, x2, w, rows, cols)

    @staticmethod
    def backward(ctx, g):
        with _plain_ops():
            x2, w = ctx.saved_tensors
            rows, cols = ctx.rows, ctx.cols
            g2 = g.reshape(-1, g.shape[-1])
            gx = None
            if ctx.needs_input_grad[0]:  # gx[:, col run] = g @ w[rows][:, col run]
                gx, i = g2.new_empty(x2.shape), 0
                for c0, cn in cols:
                    _mm_runs(g2, rows, [w[r0:r0 + rn, c0:c0 + cn] for r0, rn in rows], gx[:, i:i + cn])
                    i += cn
                gx = gx.view(ctx.x_shape)
            if ctx.needs_input_grad[1]:  # grad w[row run, col run] = g[:, row run].T @ x[:, col run]
                buf, fresh = getattr(w, "main_grad", None), False
                if buf is None:
                    if w.grad is None:
                        # Uninitialised: the kept blocks are overwritten below, the rest is zeroed here.
                        buf, fresh = torch.empty_like(w, memory_format=torch.contiguous_format), True
                        for a, n in _complement(rows, w.shape[0]):
                            buf[a:a + n].zero_()
                        for c0, cn in _complement(cols, w.shape[1]):
                            for r0, rn in rows:
                                buf[r0:r0 + rn, c0:c0 + cn].zero_()
                    else:
                        buf = w.grad
                o = 0
                for r0, rn in rows:
                    gb, i = g2[:, o:o + rn].t(), 0
                    for c0, cn in cols:
                        bb, xb = buf[r0:r0 + rn, c0:c0 + cn], x2[:, i:i + cn]
                        if fresh:
                            torch.mm(gb, xb, out=bb)
                        elif bb.dtype == gb.dtype:
                            bb.addmm_(gb, xb)
                        else:  # e.g. bf16 weights, fp32 main_grad: as megatron's DDP hook, compute then add
                            bb.add_(torch.mm(gb, xb))
                        i += cn
                    o += rn
                if fresh:
                    w.grad = buf
        return gx, None, None, None


def _linear(x: torch.Tensor, w: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
    """F.linear(x, w[rows][:, cols]) for rows / cols each None (all), a prefix length or runs of
    contiguous indices ((start, length), ...); plain F.linear on `w` itself when nothing is cut."""
    rows, cols = _as_runs(rows, w.shape[0]), _as_runs(cols, w.shape[1])
    if rows == ((0, w.shape[0]),) and cols == ((0, w.shape[1]),):
        return F.linear(x, w)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _ElasticLinear.apply(x, w, rows, cols)
    return _linear_fwd(x, x.reshape(-1, x.shape[-1]), w, rows, cols)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dim; with `mask`, over the kept channels only (k/d correction)."""
    if mask is None:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # statistics in fp32 whatever the activations' dtype (as megatron's norms): a bf16 sum of
    # thousands of mask entries would round the kept count k itself
    xf, mf = x.float(), mask.float()
    k = mf.sum().clamp(min=1.0)
    xm = xf * mf
    return (xm * torch.rsqrt(xm.pow(2).sum(-1, keepdim=True) / k + eps) * weight.float() * mf).to(x.dtype)


def group_rms_norm(y: torch.Tensor, weight: torch.Tensor, groups: int, eps: float,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mamba's gated-output norm: RMSNorm inside each of `groups` contiguous channel groups."""
    shape = y.shape
    yg = y.reshape(*shape[:-1], groups, shape[-1] // groups)
    if mask is None:
        out = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + eps)
    else:  # fp32 statistics, as rms_norm above
        mg = mask.float().reshape(groups, -1)
        k = mg.sum(-1, keepdim=True).clamp(min=1.0)
        ygf = yg.float()
        out = (ygf * mg * torch.rsqrt((ygf * mg).pow(2).sum(-1, keepdim=True) / k + eps)).to(y.dtype)
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
            x = model.embedding.word_embeddings(tokens).transpose(0, 1)  # [s, b, h]
        else:  # [s, b, h] from the previous stage (padded, see below)
            x = hidden_in if hidden_in is not None else model.decoder.input_tensor
        if soft:
            masks = masks.to(x.dtype)
        if not soft:
            x = x[..., :hk]
        elif model.pre_process:  # a later stage receives a residual stream that is masked already
            x = x * masks.hidden
        for i, layer in enumerate(model.decoder.layers):
            gi = self.offset + i
            if not soft and not s.keep[gi]:
                if collect is not None and gi in collect:
                    collect[gi] = x
                continue  # a dropped layer is the identity
            gate = gates[gi] if gates is not None else None
            # train.recompute=full: only x is kept for the backward, the layer is recomputed there
            x = x + layer_call(self.recompute, self._layer, layer, gi, x, s, masks, gate)
            if collect is not None and gi in collect:
                collect[gi] = x
        if not model.post_process:
            # p2p buffers have the parent's width: pad a narrower hidden with zeros.
            return F.pad(x, (0, self.m.hidden_size - x.shape[-1])) if x.shape[-1] < self.m.hidden_size else x
        hmask = masks.hidden if soft else None
        x = rms_norm(x, _sub(model.decoder.final_norm.weight, hk), self.m.norm_epsilon, hmask)
        x = copy_to_tensor_model_parallel_region(x)
        logits = _linear(x, model.output_layer.weight, cols=hk)  # [s, b, V/tp]
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
        if masks is not None:
            out = out * masks.hidden * masks.keep[gi]
        return out * gate if gate is not None else out

    def _tp_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A soft mask that a TP rank uses only in part (its heads, its FFN rows): identity forward,
        gradient summed over the TP ranks backward, so every rank holds the whole mask's gradient
        (the replicated router is then averaged over TP like the gates of hard mode)."""
        return copy_to_tensor_model_parallel_region(mask) if self.tp > 1 else mask

    def _norm(self, layer, kind: str, x, masks):
        """The layer's pre-norm on the kept hidden channels (its weight wherever the spec keeps it)."""
        hk = x.shape[-1]
        w = pre_norm_weight(layer, kind)
        return rms_norm(x, _sub(w, hk), self.m.norm_epsilon, masks.hidden if masks else None)

    def _mamba(self, layer, x, s: Subnet, k: int, masks: Optional[SoftMasks]):
        mixer, m = layer.mixer, self.m
        heads_l, groups_l, p, n = m.mamba_num_heads // self.tp, m.mamba_num_groups // self.tp, m.mamba_head_dim, \
            m.mamba_state_dim
        hk = x.shape[-1]
        h = self._norm(layer, "M", x, masks)
        h = copy_to_tensor_model_parallel_region(h)
        if masks is None:
            a, d = s.mamba_heads[k] // m.mamba_num_groups, s.mamba_head_dim[k]
        else:
            a, d = heads_l // groups_l, p  # full width, masked below
        _, conv_idx, kept_heads, chans = _mamba_rows(heads_l, groups_l, p, n, a, d, x.device)
        row_runs, chan_runs = _mamba_runs(heads_l, groups_l, p, n, a, d)
        zxbcdt = _linear(h, mixer.in_proj.weight, rows=row_runs, cols=hk)  # [s, b, *]
        d_in = kept_heads.numel() * d
        A = -torch.exp(_sub(mixer.A_log, kept_heads).float())
        conv_w = _sub(mixer.conv1d.weight, conv_idx).squeeze(1)  # [c, w]
        conv_b = _sub(mixer.conv1d.bias, conv_idx)
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
            mixer.chunk_size, D=_sub(mixer.D, kept_heads), z=z.reshape(b_, s_, -1, d),
            dt_bias=_sub(mixer.dt_bias, kept_heads).float(), dt_softplus=True,
        ).reshape(b_, s_, d_in)
        y = group_rms_norm(y, _sub(mixer.norm.weight, chans), groups_l, 1e-5, chan_mask)
        y = _linear(y.transpose(0, 1), mixer.out_proj.weight, rows=hk, cols=chan_runs)
        return reduce_from_tensor_model_parallel_region(y)

    def _attention(self, layer, x, s: Subnet, k: int, masks: Optional[SoftMasks]):
        m, att = self.m, layer.self_attention
        groups_l, hpg, d = m.num_query_groups // self.tp, m.num_attention_heads // m.num_query_groups, m.kv_channels
        a = hpg if masks is not None else s.attn_heads[k] // m.num_query_groups
        hk = x.shape[-1]
        h = copy_to_tensor_model_parallel_region(self._norm(layer, "*", x, masks))
        qkv_rows, proj_cols = _attn_runs(groups_l, hpg, d, a)
        qkv = _linear(h, att.linear_qkv.weight, rows=qkv_rows, cols=hk)  # [s, b, G*(a+2)*d]
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
        out = _linear(ctx, att.linear_proj.weight, rows=hk, cols=proj_cols)
        return reduce_from_tensor_model_parallel_region(out)

    def _mlp(self, layer, x, s: Subnet, k: int, masks: Optional[SoftMasks]):
        mlp, hk = layer.mlp, x.shape[-1]
        f = None if masks is not None else s.ffn[k] // self.tp
        h = copy_to_tensor_model_parallel_region(self._norm(layer, "-", x, masks))
        inter = squared_relu(_linear(h, mlp.linear_fc1.weight, rows=f, cols=hk))
        if masks is not None:
            # Under TP the sorted FFN is dealt out round-robin (elastic/sorting.py ffn_layout): row i
            # of shard r is the neuron of importance rank i * tp + r, so the mask (by rank) is strided
            inter = inter * self._tp_mask(masks.ffn[k])[ps.get_tensor_model_parallel_rank()::self.tp]
        out = _linear(inter, mlp.linear_fc2.weight, rows=hk, cols=f)
        return reduce_from_tensor_model_parallel_region(out)


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv over the sequence: x [b, s, c], weight [c, w] -> [b, s, c]."""
    w = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (w - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[-1])
    return out.transpose(1, 2)


def _mixer_ops():
    """megatron's mamba_mixer module: its scan is mamba-ssm's triton kernel on GPU, ours on CPU."""
    import megatron.core.ssm.mamba_mixer as mixer

    return mixer

