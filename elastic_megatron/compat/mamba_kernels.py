"""Pure-PyTorch Mamba-2 kernels with mamba-ssm 2.x call signatures and semantics.

megatron's `MambaMixer` calls three triton kernels from mamba-ssm (`mamba_chunk_scan_combined`,
`mamba_split_conv1d_scan_combined`, the gated `RMSNorm`). Those need a GPU and triton, so on a CPU
box `compat.mamba` patches these functions in instead. They follow the reference SSD algorithm
(mamba_ssm/modules/ssd_minimal.py): exact, differentiable by plain autograd, just slower and
heavier on memory than the fused kernels. On a GPU machine with mamba-ssm installed the real
kernels run and this file is not used.

Math is done in fp32 (float64 stays float64, so gradcheck works); outputs come back in the
input dtype, like the triton kernels. Shape letters: b batch, l seqlen, h heads, p headdim,
g B/C groups, n dstate, c chunks, d channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

_NO_LIMIT = (0.0, float("inf"))
CPU_CHUNK = 32  # longest chunk the CPU scan uses (see mamba_chunk_scan_combined)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Never compute below fp32 (bf16 cumsums/exps drift); keep float64 for gradcheck.
    return torch.promote_types(t.dtype, torch.float32)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[i, j] = sum(x[j+1..i]) for j <= i, -inf above the diagonal.

    Summing a masked copy (instead of differencing one cumsum) avoids cancellation error, and
    exp(-inf) = 0 gives the causal mask with a zero (not NaN) gradient.
    """
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # x[..., i, j] = x[i]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict, 0)
    x = torch.cumsum(x, dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return x.masked_fill(~causal, float("-inf"))


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=_NO_LIMIT, return_final_states=False,
                              return_varlen_states=False):
    """SSD scan: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,  y_t = C_t h_t + D x_t,  y *= silu(z).

    x (b,l,h,p), dt (b,l,h), A (h,), B/C (b,l,g,n), D (h,) or (h,p), z (b,l,h,p),
    dt_bias (h,), initial_states (b,h,p,n). Returns y (b,l,h,p) in x.dtype, plus the final
    state (b,h,p,n, fp32 or fp64) when return_final_states.
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError(
            "packed sequences (seq_idx / cu_seqlens / return_varlen_states) are not supported by "
            "the pure-PyTorch Mamba kernels; install mamba-ssm on a GPU machine for them")
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    assert h % g == 0, f"nheads {h} must be a multiple of ngroups {g}"
    ct = _compute_dtype(x)

    # dt preprocessing exactly as mamba-ssm's chunk-cumsum kernel: bias, softplus, clamp.
    dt = dt.to(ct)
    if dt_bias is not None:
        dt = dt + dt_bias.to(ct)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, same as the kernel
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    # Layout (b, c, g, i, Q, ...): c chunks of Q steps, heads split into B/C group g and head i
    # inside it (head = g * i_per_group + i), so B/C are never repeated per head and every
    # contraction below is a batched matmul. The result does not depend on Q; the quadratic
    # intra-chunk work grows with it, so on CPU we cap it (fastest at 16-32 in our measurements).
    i = h // g
    Q = min(chunk_size, CPU_CHUNK)
    pad = (-l) % Q  # padded steps get dt = 0: no decay and no input, the final state is unchanged
    c = (l + pad) // Q
    xc = x.to(ct)
    X = F.pad(xc * dt[..., None], (0, 0, 0, 0, 0, pad)).view(b, c, Q, g, i, p).permute(0, 1, 3, 4, 2, 5)
    dA = F.pad(dt * A.to(ct), (0, 0, 0, pad)).view(b, c, Q, g, i).permute(0, 1, 3, 4, 2)  # (b,c,g,i,Q)
    Bp = F.pad(B.to(ct), (0, 0, 0, 0, 0, pad)).view(b, c, Q, g, n).permute(0, 1, 3, 2, 4)  # (b,c,g,Q,n)
    Cp = F.pad(C.to(ct), (0, 0, 0, 0, 0, pad)).view(b, c, Q, g, n).permute(0, 1, 3, 2, 4)
    # Chunk-local cumulative log-decay. Differences of it give the decay between two steps; taking
    # them in float64 avoids the cancellation error of differencing an fp32 cumsum.
    cs64 = torch.cumsum(dA.to(torch.float64), dim=-1)
    cs = cs64.to(ct)

    # 1. Within each chunk: attention-like form, (C_l . B_s) * exp(cs_l - cs_s) for s <= l.
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device))
    decay = torch.exp((cs64[..., :, None] - cs64[..., None, :]).to(ct).masked_fill(~causal, float("-inf")))
    CB = Cp @ Bp.transpose(-1, -2)  # (b,c,g,Q,Q), shared by the heads of a group
    Y = (CB[:, :, :, None] * decay) @ X  # (b,c,g,i,Q,p)

    # 2. State each chunk leaves behind when started from zero.
    decay_states = torch.exp(cs[..., -1:] - cs)  # (b,c,g,i,Q)
    states = (X * decay_states[..., None]).transpose(-1, -2) @ Bp[:, :, :, None]  # (b,c,g,i,p,n)

    # 3. Carry states across chunks (a short recurrence, written as a segsum matmul).
    if initial_states is None:
        init = torch.zeros_like(states[:, :1])
    else:
        init = initial_states.to(ct).reshape(b, 1, g, i, p, n)
    states = torch.cat([init, states], dim=1).permute(0, 2, 3, 1, 4, 5)  # (b,g,i,c+1,p,n)
    decay_chunk = torch.exp(_segsum(F.pad(cs[..., -1].permute(0, 2, 3, 1), (1, 0))))  # (b,g,i,c+1,c+1)
    states = (decay_chunk @ states.reshape(b, g, i, c + 1, p * n)).view(b, g, i, c + 1, p, n)
    final_state = states[:, :, :, -1].reshape(b, h, p, n)
    entering = states[:, :, :, :-1].permute(0, 3, 1, 2, 4, 5)  # (b,c,g,i,p,n): state entering chunk c

    # 4. Contribution of the state entering each chunk to that chunk's outputs.
    Y = Y + (Cp[:, :, :, None] @ entering.transpose(-1, -2)) * torch.exp(cs)[..., None]

    y = Y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * Q, h, p)[:, :l]  # (b,l,h,p)
    if D is not None:
        Dc = D.to(ct)
        y = y + xc * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(x.dtype)
    return (y, final_state) if return_final_states else y  # final state stays fp32, as in mamba-ssm


def causal_conv1d(x, weight, bias=None, activation=None):
    """Depthwise causal conv, like causal_conv1d_fn: x (b,d,l), weight (d,w), bias (d,) -> (b,d,l).

    Output t sees inputs t-w+1..t (left zero padding w-1). activation: None, "silu" or "swish".
    """
    assert activation in (None, "silu", "swish"), activation
    d, w = weight.shape
    ct = torch.promote_types(_compute_dtype(x), weight.dtype)
    out = F.conv1d(F.pad(x.to(ct), (w - 1, 0)), weight.to(ct)[:, None, :],
                   bias.to(ct) if bias is not None else None, groups=d)
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def rms_norm_gated(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Gated RMSNorm of mamba-ssm's layernorm_gated: normalise each contiguous group of
    `group_size` channels (all channels if None), scale by weight (+bias), and gate with silu(z)
    after the norm (norm_before_gate) or before it. Computed in fp32, returned in x.dtype."""
    dtype = x.dtype
    ct = _compute_dtype(x)
    x = x.to(ct)
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.to(ct))
    group_size = x.shape[-1] if group_size is None else group_size
    xg = rearrange(x, "... (g d) -> ... g d", d=group_size)
    xg = xg * torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = rearrange(xg, "... g d -> ... (g d)") * weight.to(ct)
    if bias is not None:
        out = out + bias.to(ct)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(ct))
    return out.to(dtype)


class RMSNormGated(torch.nn.Module):
    """Drop-in for mamba_ssm.ops.triton.layernorm_gated.RMSNorm (same constructor and params)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True,
                 device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return rms_norm_gated(x, self.weight, self.bias, z=z, eps=self.eps,
                              group_size=self.group_size, norm_before_gate=self.norm_before_gate)


def split_conv1d_scan_on(scan, gated_norm):
    """mamba_split_conv1d_scan_combined built from a given SSD scan and gated RMSNorm.

    mamba-ssm's own fused version needs the causal-conv1d CUDA extension; with only its Triton
    kernels installed (backend `triton`, compat/backends.py) we compose ours around its scan and norm.
    """

    def combined(*args, **kwargs):
        return _split_conv1d_scan(scan, gated_norm, *args, **kwargs)

    return combined


def _split_conv1d_scan(scan, gated_norm, zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D,
                       chunk_size, initial_states=None, seq_idx=None,
                       dt_limit=_NO_LIMIT, return_final_states=False,
                       activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6,
                       outproj_weight=None, outproj_bias=None, headdim=None,
                       ngroups=1, norm_before_gate=True):
    """Mamba-2 block core: split in_proj output, causal conv, SSD scan, gate/norm, out proj.

    zxbcdt (b,l, 2*d_nonssm + 2*dim + 2*g*n + h) = [zx0 (swiglu part, usually empty), z, xBC, dt]
    conv1d_weight (dim + 2*g*n, w). D (h,) needs headdim; D (h,p) implies it.
    Returns (b,l,d_nonssm + dim), or (b,l,out) after outproj; plus final state if asked.
    """
    if seq_idx is not None:
        raise NotImplementedError(
            "packed sequences (seq_idx) are not supported by the pure-PyTorch Mamba kernels; "
            "install mamba-ssm on a GPU machine for them")
    assert activation in (None, "silu", "swish"), activation
    if D.dim() == 1:
        assert headdim is not None, "headdim is required when D is per head"
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    batch, seqlen, _ = zxbcdt.shape
    dim = nheads * headdim
    assert nheads % ngroups == 0
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    assert d_nonssm >= 0 and zxbcdt.shape[-1] == 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads
    zx0, z, xBC, dt = torch.split(
        zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)

    xBC = causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = rearrange(x, "b l (h p) -> b l h p", h=nheads)
    B = rearrange(B, "b l (g n) -> b l g n", g=ngroups)
    C = rearrange(C, "b l (g n) -> b l g n", g=ngroups)
    z = rearrange(z, "b l (h p) -> b l h p", h=nheads)

    # With a norm, the gate goes through the norm; without one, the scan gates y * silu(z).
    y, final_state = scan(
        x, dt, A, B, C, chunk_size, D=D, z=z if rmsnorm_weight is None else None, dt_bias=dt_bias,
        initial_states=initial_states, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=True)
    y = rearrange(y, "b l h p -> b l (h p)")
    if rmsnorm_weight is not None:
        y = gated_norm(y, rmsnorm_weight, None, z=rearrange(z, "b l h p -> b l (h p)"),
                           eps=rmsnorm_eps, group_size=dim // ngroups,
                           norm_before_gate=norm_before_gate)
    if d_nonssm > 0:
        z0, x0 = zx0.chunk(2, dim=-1)
        y = torch.cat([(F.silu(z0) * x0).to(y.dtype), y], dim=-1)  # swiglu, as in mamba-ssm
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight.to(y.dtype),
                     outproj_bias.to(y.dtype) if outproj_bias is not None else None)
    else:
        assert outproj_bias is None
    return (y, final_state) if return_final_states else y


# The pure-PyTorch version, same signature as mamba_ssm.ops.triton.ssd_combined's.
mamba_split_conv1d_scan_combined = split_conv1d_scan_on(mamba_chunk_scan_combined, rms_norm_gated)
