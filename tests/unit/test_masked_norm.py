"""elastic/masked_norm.py: the soft-mode RMSNorm over a mask's kept channels.

Its hand-written backward is checked against finite differences (fp64 gradcheck) and against the
same formula written as plain torch ops (autograd's gradients), including masks whose kept count
falls below 1 (the clamp). What it saves is measured with a saved-tensors hook: the input and one
fp32 rstd per group and token, where the plain ops keep four fp32 copies of the input.
"""

from __future__ import annotations

import pytest
import torch

from elastic_megatron.elastic.masked_norm import masked_rms_norm


def plain(x, w, mask, eps, groups, mask_output):
    """The formula as torch ops (what elastic/model.py ran before masked_norm.py)."""
    shape = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc).reshape(*shape[:-1], groups, -1)
    mf = mask.to(acc).reshape(groups, -1)
    k = mf.sum(-1, keepdim=True).clamp(min=1.0)
    xm = xf * mf
    out = (xm * torch.rsqrt(xm.pow(2).sum(-1, keepdim=True) / k + eps)).reshape(shape) * w.to(acc)
    if mask_output:
        out = out * mask.to(acc)
    return out.to(x.dtype)


CASES = [(1, True, 1.0), (4, False, 1.0), (2, True, 1.0), (1, True, 0.04), (4, False, 0.04)]  # groups, mask out, scale


@pytest.mark.parametrize("groups,mask_output,scale", CASES)
def test_gradients_are_exact(groups, mask_output, scale):
    g = torch.Generator().manual_seed(groups * 10 + int(mask_output))
    d = 16
    x = torch.randn(3, 2, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(d, dtype=torch.float64, generator=g, requires_grad=True)
    # scale 0.04: every group keeps less than one channel's worth, so k is clamped to 1
    m = (torch.rand(d, dtype=torch.float64, generator=g) * scale).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: masked_rms_norm(a, b, c, 1e-5, groups, mask_output), (x, w, m))
    out, ref = masked_rms_norm(x, w, m, 1e-5, groups, mask_output), plain(x, w, m, 1e-5, groups, mask_output)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(out, (x, w, m), grad), torch.autograd.grad(ref, (x, w, m), grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bf16_matches_the_plain_ops_and_saves_a_sixth():
    g = torch.Generator().manual_seed(0)
    s, b, h = 64, 2, 96
    x = torch.randn(s, b, h, generator=g).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(h, generator=g)).bfloat16().requires_grad_()
    m = torch.rand(h, generator=g).bfloat16().requires_grad_()
    saved = {}
    for name, fn in (("masked", masked_rms_norm), ("plain", plain)):
        seen = {}

        def pack(t, seen=seen):
            if t.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in (x, w, m)}:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x, w, m, 1e-5, 1, True)
        saved[name] = sum(seen.values())
        grads = torch.autograd.grad(out.float().pow(2).sum(), (x, w, m))
        saved[name, "out"], saved[name, "grads"] = out, grads
    torch.testing.assert_close(saved["masked", "out"], saved["plain", "out"], rtol=1e-2, atol=1e-2)
    for a, c in zip(saved["masked", "grads"], saved["plain", "grads"]):
        torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2 * float(c.float().abs().max()))
    # masked: fp32 rstd per token only (x itself is excluded above, as an input); plain: the fp32 input,
    # the masked input, the normalised and the weighted copies (16 bytes per channel and token)
    assert saved["masked"] == 4 * s * b, saved["masked"]
    assert saved["plain"] >= 16 * s * b * h, saved["plain"]
