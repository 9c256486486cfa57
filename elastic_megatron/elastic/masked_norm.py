"""RMSNorm over the kept channels of a soft mask, with a hand-written backward that saves little.

    out = masked_rms_norm(x, weight, mask, eps, groups=1, mask_output=True)   # x [..., d], mask [d]

Soft routing (elastic/model.py with `masks`) normalises over the channels a probability-weighted
prefix mask keeps: per group of d / groups channels, with k = max(sum(mask), 1) kept,

    xm = x * mask;   r = rsqrt(sum(xm^2) / k + eps);   out = xm * r * weight (* mask if mask_output)

in fp32 whatever x's dtype (a bf16 sum of thousands of mask entries would round k itself), returned
in x's dtype. Written as plain torch ops, autograd keeps the fp32 input, the masked input twice,
the normalised and the weighted copies: 16 bytes per channel per token, three times a bf16 layer's
input, and replicated over tensor parallelism. This function keeps x (in its own dtype) and r
(fp32, one per group and token) and recomputes the rest in the backward: 2 bytes per channel in
bf16. Gradients for x, weight and mask are exact (the mask's includes k's dependence on it; below
k = 1 the clamp passes none, as torch.clamp's backward).

Backward, per group, with g the output gradient and u = xm * r:
    dweight = sum_tokens g * u * m^t           dmask (output factor, t = 1) = sum_tokens g * u * weight
    du = g * weight * m^t                      c = sum(du * xm)  (per token and group)
    dxm = r * du - r^3 / k * c * xm            dk = sum_tokens c * r^3 * sum(xm^2) / (2 k^2)
    dx = dxm * m                               dmask += sum_tokens dxm * x  + dk (every channel of the group)
"""

from __future__ import annotations

import torch


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], groups, t.shape[-1] // groups)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _MaskedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, eps: float, groups: int, mask_output: bool):
        m = _grouped(_acc(mask), groups)  # [G, d/G]
        k_raw = m.sum(-1)  # [G]
        k = k_raw.clamp(min=1.0)
        xm = _grouped(_acc(x), groups) * m  # [..., G, d/G]
        r = torch.rsqrt(xm.pow(2).sum(-1) / k + eps)  # [..., G]
        out = (xm * r[..., None]).reshape(x.shape) * _acc(weight)
        if mask_output:
            out = out * _acc(mask)
        ctx.save_for_backward(x, weight, mask, r)
        ctx.eps, ctx.groups, ctx.mask_output = eps, groups, mask_output
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        # Written to keep few [tokens, d] fp32 temporaries alive at once (each `del` frees one).
        x, weight, mask, r = ctx.saved_tensors
        G, out_masked = ctx.groups, ctx.mask_output
        need_w, need_m = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        m = _grouped(_acc(mask), G)  # [G, d/G]
        k_raw = m.sum(-1)
        k = k_raw.clamp(min=1.0)
        w = _grouped(_acc(weight), G)
        rr = r[..., None]
        xm = _grouped(_acc(x), G) * m  # [..., G, d/G]
        gg = _grouped(_acc(g), G)
        lead = tuple(range(gg.dim() - 2))  # token dims, summed for the per-channel gradients
        dweight = dmask = None
        if need_w or (need_m and out_masked):
            gu = gg * xm * rr  # g * u
            if need_w:
                dweight = (gu * m if out_masked else gu).sum(lead).reshape(weight.shape).to(weight.dtype)
            if need_m and out_masked:
                dmask = (gu * w).sum(lead)
            del gu
        du = gg * (w * m if out_masked else w)
        del gg
        c = (du * xm).sum(-1)  # [..., G]
        r3 = r.pow(3)
        dxm = du * rr
        del du
        dxm -= (r3 / k * c)[..., None] * xm
        dx = (dxm * m).reshape(x.shape).to(x.dtype)
        if need_m:
            dk = (c * r3 * xm.pow(2).sum(-1)).sum(lead) / (2 * k * k)  # [G]
            dk = dk * (k_raw >= 1.0)  # clamp(min=1) passes a gradient only where it did not clamp
            del xm
            dm = (dxm * _grouped(_acc(x), G)).sum(lead) + dk[:, None]
            dmask = (dm if dmask is None else dmask + dm).reshape(mask.shape).to(mask.dtype)
        return dx, dweight, dmask, None, None, None


def masked_rms_norm(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, eps: float, groups: int = 1,
                    mask_output: bool = True) -> torch.Tensor:
    """RMSNorm of x [..., d] over the channels `mask` [d] keeps, per group of d / groups (module docstring)."""
    return _MaskedRMSNorm.apply(x, weight, mask, eps, groups, mask_output)
