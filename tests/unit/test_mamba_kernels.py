"""The pure-PyTorch Mamba-2 kernels against a naive token-by-token recurrence written here.

The chunked SSD algorithm and the recurrence share no code, so agreement to 1e-5 in fp32 checks
the chunking, padding, grouping, state carrying, gating and gradients of the kernels.
"""

import pytest
import torch
import torch.nn.functional as F

from elastic_megatron.compat.mamba_kernels import (
    RMSNormGated,
    causal_conv1d,
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    rms_norm_gated,
)

TOL = 1e-5


# ----------------------------------------------------------------------------- references
def naive_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
               initial_states=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = C_t h_t + D x_t ; y *= silu(z). float64."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit is not None:
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    grp = torch.arange(h) // (h // g)  # head -> group
    state = (torch.zeros(b, h, p, n, dtype=torch.float64) if initial_states is None
             else initial_states.double())
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b,h)
        Bt, Ct = B[:, t, grp], C[:, t, grp]  # (b,h,n)
        state = decay[..., None, None] * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bt[:, :, None, :]
        y = (state * Ct[:, :, None, :]).sum(-1)  # (b,h,p)
        if D is not None:
            Dd = D.double()
            y = y + x[:, t] * (Dd[:, None] if Dd.dim() == 1 else Dd)
        ys.append(y)
    y = torch.stack(ys, dim=1)
    if z is not None:
        y = y * F.silu(z.double())
    return y, state


def naive_conv(x, weight, bias):
    """x (b,d,l), weight (d,w): out[t] = bias + sum_k weight[k] * x[t - (w-1) + k], then silu."""
    b, d, l = x.shape
    w = weight.shape[1]
    out = torch.zeros(b, d, l, dtype=torch.float64)
    for t in range(l):
        acc = bias.double().expand(b, d).clone() if bias is not None else torch.zeros(b, d, dtype=torch.float64)
        for k in range(w):
            src = t - (w - 1) + k
            if src >= 0:
                acc = acc + weight[:, k].double() * x[:, :, src].double()
        out[:, :, t] = acc
    return F.silu(out)


def naive_gated_rmsnorm(x, weight, z, eps, group_size, norm_before_gate):
    x, weight, z = x.double(), weight.double(), z.double()
    if not norm_before_gate:
        x = x * z * torch.sigmoid(z)
    out = torch.empty_like(x)
    for s in range(0, x.shape[-1], group_size):
        xs = x[..., s:s + group_size]
        out[..., s:s + group_size] = xs / torch.sqrt((xs * xs).mean(-1, keepdim=True) + eps)
    out = out * weight
    if norm_before_gate:
        out = out * z * torch.sigmoid(z)
    return out


def make_inputs(b=2, l=37, h=4, g=2, p=3, n=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return dict(
        x=r(b, l, h, p).to(dtype),
        dt=(r(b, l, h) - 1.0).to(dtype),  # raw, pre-softplus
        A=-torch.exp(r(h) * 0.5).to(dtype),
        B=(r(b, l, g, n) / n ** 0.5).to(dtype),
        C=(r(b, l, g, n) / n ** 0.5).to(dtype),
        z=r(b, l, h, p).to(dtype),
        dt_bias=(r(h) * 0.5).to(dtype),
        D_h=r(h).to(dtype),
        D_hp=r(h, p).to(dtype),
        init=r(b, h, p, n).to(dtype),
    )


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- scan
@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("g,D_kind,use_z", [(2, "h", True), (1, "hp", False), (4, None, True)])
def test_scan_matches_recurrence(chunk, g, D_kind, use_z):
    t = make_inputs(g=g)
    D = {"h": t["D_h"], "hp": t["D_hp"], None: None}[D_kind]
    z = t["z"] if use_z else None
    y = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=D, z=z,
                                  dt_bias=t["dt_bias"], dt_softplus=True)
    ref, _ = naive_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], D=D, z=z, dt_bias=t["dt_bias"],
                        dt_softplus=True)
    assert y.shape == t["x"].shape and y.dtype == torch.float32
    assert maxdiff(y, ref) <= TOL


def test_scan_without_softplus_uses_dt_as_given():
    t = make_inputs(l=19)
    dt = F.softplus(t["dt"])  # positive dt fed directly
    y = mamba_chunk_scan_combined(t["x"], dt, t["A"], t["B"], t["C"], 8, D=t["D_h"])
    ref, _ = naive_scan(t["x"], dt, t["A"], t["B"], t["C"], D=t["D_h"])
    assert maxdiff(y, ref) <= TOL


def test_dt_limit_clamps():
    t = make_inputs()
    lim = (0.2, 0.6)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 16)
    kw = dict(D=t["D_h"], dt_bias=t["dt_bias"], dt_softplus=True)
    y = mamba_chunk_scan_combined(*args, dt_limit=lim, **kw)
    ref, _ = naive_scan(*args[:5], dt_limit=lim, **kw)
    assert maxdiff(y, ref) <= TOL
    # The limit must actually bite on these inputs (so the test above can tell).
    unclamped = mamba_chunk_scan_combined(*args, **kw)
    assert maxdiff(unclamped, ref) > 1e-2


def test_initial_and_final_states_and_continuation():
    t = make_inputs()
    common = dict(D=t["D_hp"], dt_bias=t["dt_bias"], dt_softplus=True)
    sl = lambda k, a, b_: t[k][:, a:b_]
    y, last = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, z=t["z"],
                                        initial_states=t["init"], return_final_states=True, **common)
    ref, ref_last = naive_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], z=t["z"],
                               initial_states=t["init"], **common)
    assert last.shape == t["init"].shape and last.dtype == torch.float32
    assert maxdiff(y, ref) <= TOL and maxdiff(last, ref_last) <= TOL

    # Running [0:20] then [20:37] from the carried state equals one run over [0:37].
    parts, state = [], None
    for a, b_ in [(0, 20), (20, 37)]:
        yp, state = mamba_chunk_scan_combined(sl("x", a, b_), sl("dt", a, b_), t["A"], sl("B", a, b_),
                                              sl("C", a, b_), 8, z=sl("z", a, b_),
                                              initial_states=state, return_final_states=True, **common)
        parts.append(yp)
    full, full_last = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8,
                                                z=t["z"], return_final_states=True, **common)
    assert maxdiff(torch.cat(parts, 1), full) <= TOL and maxdiff(state, full_last) <= TOL


def test_low_precision_returns_input_dtype():
    t = make_inputs(l=21)
    xb = t["x"].bfloat16()
    y = mamba_chunk_scan_combined(xb, t["dt"].bfloat16(), t["A"], t["B"].bfloat16(),
                                  t["C"].bfloat16(), 8, D=t["D_h"], dt_bias=t["dt_bias"],
                                  dt_softplus=True)
    ref, _ = naive_scan(xb, t["dt"].bfloat16(), t["A"], t["B"].bfloat16(), t["C"].bfloat16(),
                        D=t["D_h"], dt_bias=t["dt_bias"], dt_softplus=True)
    assert y.dtype == torch.bfloat16
    assert maxdiff(y, ref) <= 0.05 * ref.abs().max().item()  # only the final rounding to bf16


def test_packed_sequences_unsupported():
    t = make_inputs(l=8)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 8)
    seq_idx = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(NotImplementedError):
        mamba_chunk_scan_combined(*args, seq_idx=seq_idx)
    with pytest.raises(NotImplementedError):
        mamba_chunk_scan_combined(*args, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(NotImplementedError):
        mamba_chunk_scan_combined(*args, return_varlen_states=True)


# ----------------------------------------------------------------------------- gradients
def test_gradcheck_double():
    t = make_inputs(b=1, l=5, h=2, g=1, p=2, n=3, dtype=torch.float64, seed=1)
    names = ["x", "dt", "A", "B", "C", "D_h", "z", "dt_bias", "init"]
    inputs = [t[k].clone().requires_grad_() for k in names]

    def f(x, dt, A, B, C, D, z, dt_bias, init):
        y, s = mamba_chunk_scan_combined(x, dt, A, B, C, 2, D=D, z=z, dt_bias=dt_bias,
                                         initial_states=init, dt_softplus=True,
                                         return_final_states=True)
        return y, s

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_grads_match_recurrence_fp32():
    t = make_inputs()
    names = ["x", "dt", "A", "B", "C", "D_h", "z", "dt_bias", "init"]
    ours = {k: t[k].clone().requires_grad_() for k in names}
    theirs = {k: t[k].double().requires_grad_() for k in names}
    w = torch.randn(t["x"].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = mamba_chunk_scan_combined(ours["x"], ours["dt"], ours["A"], ours["B"], ours["C"], 16,
                                  D=ours["D_h"], z=ours["z"], dt_bias=ours["dt_bias"],
                                  initial_states=ours["init"], dt_softplus=True)
    ref, _ = naive_scan(theirs["x"], theirs["dt"], theirs["A"], theirs["B"], theirs["C"],
                        D=theirs["D_h"], z=theirs["z"], dt_bias=theirs["dt_bias"],
                        initial_states=theirs["init"], dt_softplus=True)
    (y.double() * w).sum().backward()
    (ref * w).sum().backward()
    for k in names:
        scale = max(1.0, theirs[k].grad.abs().max().item())
        assert maxdiff(ours[k].grad, theirs[k].grad) <= 2 * TOL * scale, k


# ----------------------------------------------------------------------------- conv + combined
def test_causal_conv1d_matches_loop():
    gen = torch.Generator().manual_seed(4)
    x, w, bias = torch.randn(2, 6, 11, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    assert maxdiff(causal_conv1d(x, w, bias, "silu"), naive_conv(x, w, bias)) <= TOL
    assert maxdiff(causal_conv1d(x, w, None, None), F.silu(causal_conv1d(x, w, None, None))) > 0.1


@pytest.mark.parametrize("use_norm,norm_before_gate", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("D_per_hp", [False, True])
def test_split_conv1d_scan_combined(use_norm, norm_before_gate, D_per_hp):
    b, l, h, p, g, n, w, chunk = 2, 37, 4, 3, 2, 5, 4, 16
    dim = h * p
    t = make_inputs(b=b, l=l, h=h, g=g, p=p, n=n)
    gen = torch.Generator().manual_seed(5)
    zxbcdt = torch.randn(b, l, 2 * dim + 2 * g * n + h, generator=gen)
    conv_w = torch.randn(dim + 2 * g * n, w, generator=gen) * 0.5
    conv_b = torch.randn(dim + 2 * g * n, generator=gen) * 0.1
    norm_w = torch.rand(dim, generator=gen) + 0.5
    out_w = torch.randn(7, dim, generator=gen)
    out_b = torch.randn(7, generator=gen)
    D = t["D_hp"] if D_per_hp else t["D_h"]

    out, last = mamba_split_conv1d_scan_combined(
        zxbcdt, conv_w, conv_b, t["dt_bias"], t["A"], D, chunk, initial_states=t["init"],
        return_final_states=True, rmsnorm_weight=norm_w if use_norm else None, rmsnorm_eps=1e-5,
        outproj_weight=out_w, outproj_bias=out_b, headdim=None if D_per_hp else p, ngroups=g,
        norm_before_gate=norm_before_gate)

    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * g * n, h], dim=-1)
    xBC = naive_conv(xBC.transpose(1, 2), conv_w, conv_b).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, g * n, g * n], dim=-1)
    y, ref_last = naive_scan(x.reshape(b, l, h, p), dt, t["A"], B.reshape(b, l, g, n),
                             C.reshape(b, l, g, n), D=D, z=None if use_norm else z.reshape(b, l, h, p),
                             dt_bias=t["dt_bias"], dt_softplus=True, initial_states=t["init"])
    y = y.reshape(b, l, dim)
    if use_norm:
        y = naive_gated_rmsnorm(y, norm_w, z, 1e-5, dim // g, norm_before_gate)
    ref = y @ out_w.double().T + out_b.double()
    assert out.shape == (b, l, 7)
    assert maxdiff(out, ref) <= 2 * TOL * max(1.0, ref.abs().max().item())
    assert maxdiff(last, ref_last) <= TOL

    no_proj = mamba_split_conv1d_scan_combined(
        zxbcdt, conv_w, conv_b, t["dt_bias"], t["A"], D, chunk, initial_states=t["init"],
        rmsnorm_weight=norm_w if use_norm else None, rmsnorm_eps=1e-5,
        headdim=None if D_per_hp else p, ngroups=g, norm_before_gate=norm_before_gate)
    assert no_proj.shape == (b, l, dim) and maxdiff(no_proj, y) <= TOL


def test_split_conv1d_scan_combined_rejects_seq_idx():
    zxbcdt = torch.randn(1, 8, 2 * 4 + 2 * 2 + 2)
    with pytest.raises(NotImplementedError):
        mamba_split_conv1d_scan_combined(zxbcdt, torch.randn(8, 4), None, torch.zeros(2),
                                         -torch.ones(2), torch.ones(2), 4, headdim=2,
                                         seq_idx=torch.zeros(1, 8, dtype=torch.int32))


# ----------------------------------------------------------------------------- gated RMSNorm
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rmsnorm(norm_before_gate):
    gen = torch.Generator().manual_seed(6)
    x, z = torch.randn(3, 5, 12, generator=gen) * 3, torch.randn(3, 5, 12, generator=gen)
    norm = RMSNormGated(12, eps=1e-5, group_size=4, norm_before_gate=norm_before_gate)
    assert norm.bias is None and [n for n, _ in norm.named_parameters()] == ["weight"]
    assert torch.equal(norm.weight.detach(), torch.ones(12))
    with torch.no_grad():
        norm.weight.copy_(torch.rand(12, generator=gen) + 0.5)
    ref = naive_gated_rmsnorm(x, norm.weight.detach(), z, 1e-5, 4, norm_before_gate)
    assert maxdiff(norm(x, z), ref) <= TOL
    # Grouping matters: a whole-row norm gives a different answer.
    whole = rms_norm_gated(x, norm.weight, None, z=z, eps=1e-5, norm_before_gate=norm_before_gate)
    assert maxdiff(whole, ref) > 1e-2
    assert maxdiff(whole, naive_gated_rmsnorm(x, norm.weight.detach(), z, 1e-5, 12, norm_before_gate)) <= TOL
    # Gate placement matters too.
    other = naive_gated_rmsnorm(x, norm.weight.detach(), z, 1e-5, 4, not norm_before_gate)
    assert maxdiff(norm(x, z), other) > 1e-2


def test_rmsnorm_without_gate_and_dtype():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 8, generator=gen)
    norm = RMSNormGated(8, dtype=torch.bfloat16)
    assert norm.weight.dtype == torch.bfloat16 and norm.eps == 1e-5
    out = norm(x.bfloat16())
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert out.dtype == torch.bfloat16 and maxdiff(out, ref) <= 2e-2
    bias = torch.randn(8, generator=gen)
    ref_b = ref * 2.0 + bias.double()
    assert maxdiff(rms_norm_gated(x, 2 * torch.ones(8), bias, eps=1e-5), ref_b) <= TOL
