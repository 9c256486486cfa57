"""Linear layers and small weights cut to a subnet without copying the parent's weights.

    y = sliced_linear(x, w, rows=((0, 64), (128, 64)), cols=96)   # F.linear(x, w[rows][:, :96])
    w_kept = kept_rows(w, rows)                                    # a norm / conv / A_log slice

The elastic forward (elastic/model.py) runs a subnet on views of the parent's parameters. A kept
set of rows or columns is a few contiguous runs (per B/C or KV group), so each projection is one
GEMM per run on a strided view of the parent weight (BLAS takes the row stride as leading
dimension), and the backward writes each run's weight gradient straight into the kept part of the
gradient buffer (megatron DDP's `main_grad` in training, else `.grad`): no sliced-weight copy, no
temporary parent-sized gradient, no index scatter. In bf16 the runs of a summed-over dim are
concatenated first, so the rounding is that of one GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def index_runs(idx: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """An index tensor as maximal runs of consecutive indices: ((start, length), ...), in order."""
    runs: list[list[int]] = []
    for i in idx.tolist():
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return tuple((a, n) for a, n in runs)


def _select_rows(t: torch.Tensor, rows) -> torch.Tensor:
    """t[:rows] for a prefix length, t[rows] for an index tensor."""
    return t.narrow(0, 0, rows) if isinstance(rows, int) else t.index_select(0, rows.to(t.device))


class _SubWeight(torch.autograd.Function):
    """w[rows] (a small weight: norm, conv, A_log, D, dt_bias) whose backward adds the gradient into
    the kept rows of the weight's gradient buffer (megatron DDP's `main_grad`, else `.grad`) instead
    of returning a zero-filled parent-sized gradient. The projections go through `sliced_linear`."""

    @staticmethod
    def forward(ctx, w, rows):
        ctx.weight, ctx.rows = w, rows  # the parameter itself, not a saved copy: see _ElasticLinear
        return _select_rows(w, rows).contiguous()

    @staticmethod
    def backward(ctx, g):
        w = ctx.weight
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


def kept_rows(w: torch.Tensor, rows) -> torch.Tensor:
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
        # The weight is kept as the Parameter object, not saved: the backward writes into *its* gradient
        # buffer. A saved tensor comes back from activation recomputation (torch.utils.checkpoint)
        # as a detached alias, whose `.grad` / `main_grad` would be a new, lost buffer.
        ctx.save_for_backward(x2)
        ctx.weight, ctx.rows, ctx.cols, ctx.x_shape = w, rows, cols, x.shape
        return _linear_fwd(x, x2, w, rows, cols)

    @staticmethod
    def backward(ctx, g):
        with _plain_ops():
            (x2,), w = ctx.saved_tensors, ctx.weight
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


def sliced_linear(x: torch.Tensor, w: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
    """F.linear(x, w[rows][:, cols]) for rows / cols each None (all), a prefix length or runs of
    contiguous indices ((start, length), ...); plain F.linear on `w` itself when nothing is cut."""
    rows, cols = _as_runs(rows, w.shape[0]), _as_runs(cols, w.shape[1])
    if rows == ((0, w.shape[0]),) and cols == ((0, w.shape[1]),):
        return F.linear(x, w)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _ElasticLinear.apply(x, w, rows, cols)
    return _linear_fwd(x, x.reshape(-1, x.shape[-1]), w, rows, cols)
