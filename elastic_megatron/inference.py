"""Cached greedy decoding for a (sliced or parent) hybrid model on one process.

    texts = greedy_generate(model, tok, prompts, max_new=120)

Without a cache every new token re-runs the whole prefix: a 500-token answer costs ~125k token
forwards per row. Here each layer keeps its decode state, so a token costs one step:

    Mamba-2:   conv state  [b, c, w]  (the last w inputs of the depthwise causal conv)
               SSM state   [b, H, p, N]   h <- exp(dt*A) h + dt * x B^T ;  y = h C + D x
    attention: K, V cache  [b, G, t, d]   (one position per step, in blocks of KV_BLOCK)
    MLP:       stateless

The step math is the recurrent form of the chunked scan the model trains with (same weights, same
gating and group RMSNorm), so cached logits equal the full forward's to fp32 rounding
(tests/unit/test_inference.py). Rows with prompts of different lengths need no padding: every row
advances one position per step, feeding its own prompt token while it has one and its last
generated token after that. Tensor parallel / pipeline stages are not handled (evaluation runs the
exported model at TP=1); the layers must be megatron's local modules (not Transformer Engine's
fused norm+linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .compat import native
from .elastic.model import group_rms_norm, rms_norm
from .model.hybrid import squared_relu
from .model.weights import pre_norm_weight


class CachedDecoder:
    """Step-by-step forward of a megatron MambaModel (TP=1, PP=1) with per-layer decode state."""

    def __init__(self, model, pattern: str, eps: float):
        if not (model.pre_process and model.post_process):
            raise ValueError("cached decoding needs the whole model on one process (PP=1)")
        self.model, self.pattern, self.eps = model, pattern, eps
        self.state: list = [None] * len(pattern)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b] (the next position of every row) -> logits [b, V]."""
        m = self.model
        x = m.embedding.word_embeddings(tokens)  # [b, h]
        for i, (kind, layer) in enumerate(zip(self.pattern, m.decoder.layers)):
            if kind == "M":
                x = x + self._mamba(i, layer, x)
            elif kind == "*":
                x = x + self._attention(i, layer, x)
            else:
                h = rms_norm(x, pre_norm_weight(layer, "-"), self.eps)
                x = x + F.linear(squared_relu(F.linear(h, layer.mlp.linear_fc1.weight)), layer.mlp.linear_fc2.weight)
        x = rms_norm(x, m.decoder.final_norm.weight, self.eps)
        return F.linear(x, m.output_layer.weight)  # [b, V]

    def _mamba(self, i: int, layer, x: torch.Tensor) -> torch.Tensor:
        mx = layer.mixer
        H, p, G, N = mx.nheads_local_tp, mx.headdim, mx.ngroups_local_tp, mx.d_state
        d_in, b = H * p, x.shape[0]
        zxbcdt = F.linear(rms_norm(x, pre_norm_weight(layer, "M"), self.eps), mx.in_proj.weight)  # [b, 2d_in+2GN+H]
        z, xbc, dt = torch.split(zxbcdt, [d_in, d_in + 2 * G * N, H], dim=-1)
        if self.state[i] is None:
            w = mx.conv1d.weight.shape[-1]
            self.state[i] = (x.new_zeros(b, xbc.shape[-1], w), x.new_zeros(b, H, p, N, dtype=torch.float32))
        y = mamba_step(self.state[i], xbc, z, dt, mx.conv1d.weight.squeeze(1), mx.conv1d.bias,
                       -torch.exp(mx.A_log.float()), mx.D.float(), mx.dt_bias.float(), mx.norm.weight, G)
        return F.linear(y, mx.out_proj.weight)

    def _attention(self, i: int, layer, x: torch.Tensor) -> torch.Tensor:
        att = layer.self_attention
        d = att.hidden_size_per_attention_head
        G = att.num_query_groups_per_partition
        hpg = att.num_attention_heads_per_partition // G
        b = x.shape[0]
        qkv = F.linear(rms_norm(x, pre_norm_weight(layer, "*"), self.eps), att.linear_qkv.weight)
        qkv = qkv.view(b, G, hpg + 2, d)  # per group: [q_0 .. q_hpg-1, k, v]
        ctx, self.state[i] = attention_step(self.state[i], qkv[:, :, :hpg], qkv[:, :, hpg:hpg + 1],
                                            qkv[:, :, hpg + 1:])
        return F.linear(ctx, att.linear_proj.weight)


KV_BLOCK = 256  # positions the KV cache grows by: one copy of the cache per 256 tokens, not per token


def attention_step(state, q, k, v):
    """One decode position of grouped-query attention. q [b, G, a, d] (the a query heads of each KV
    group), k, v [b, G, 1, d]; state None or (K, V [b, G, capacity, d], length). Returns
    (ctx [b, G*a*d] in head order, new state). The newest position sees every cached one, so the a
    heads of a group are a query positions of one SDPA call on the group's K, V: no per-head copy
    of the cache (repeat_interleave copied all of it every token). Shared by CachedDecoder and
    serve/engine.py."""
    b, G, a, d = q.shape
    if state is None:
        state = (k.new_zeros(b, G, KV_BLOCK, d), v.new_zeros(b, G, KV_BLOCK, d), 0)
    K, V, n = state
    if n == K.shape[2]:  # full: grow by one block
        K, V = (torch.cat([c, c.new_zeros(b, G, KV_BLOCK, d)], dim=2) for c in (K, V))
    K[:, :, n:n + 1].copy_(k)
    V[:, :, n:n + 1].copy_(v)
    ctx = F.scaled_dot_product_attention(q, K[:, :, :n + 1], V[:, :, :n + 1])  # [b, G, a, d]
    return ctx.reshape(b, G * a * d), (K, V, n + 1)


def mamba_step(state, xbc, z, dt, conv_w, conv_b, A, D, dt_bias, norm_w, groups: int) -> torch.Tensor:
    """One decode step of a Mamba-2 mixer after its in_proj, up to (not including) out_proj; the state
    (conv [b, c, w], ssm [b, H, p, N] fp32) is updated in place. Inputs head-major: z [b, H*p],
    xbc [b, H*p + 2GN], dt [b, H]; conv_w [c, w]. Shared by CachedDecoder (a sliced model's own
    weights) and serve/engine.py (a budget's kept channels of the parent). Returns y [b, H*p]."""
    conv, ssm = state
    b, H = dt.shape
    N = ssm.shape[-1]
    p = z.shape[-1] // H
    conv.copy_(torch.cat([conv[:, :, 1:], xbc[:, :, None]], dim=-1))  # shift in the newest input
    xbc = F.silu((conv * conv_w).sum(-1) + conv_b)  # [b, c]
    xs, B, C = torch.split(xbc, [H * p, groups * N, groups * N], dim=-1)
    xs = xs.view(b, H, p).float()
    a = H // groups
    B = B.view(b, groups, 1, N).expand(b, groups, a, N).reshape(b, H, N).float()  # head h uses group h // a
    C = C.view(b, groups, 1, N).expand(b, groups, a, N).reshape(b, H, N).float()
    dt = F.softplus(dt.float() + dt_bias)  # [b, H]
    ssm.mul_(torch.exp(dt * A)[:, :, None, None]).add_(dt[:, :, None, None] * xs[..., None] * B[:, :, None, :])
    y = (ssm * C[:, :, None, :]).sum(-1) + D[None, :, None] * xs  # [b, H, p]
    y = y.reshape(b, H * p).to(z.dtype) * F.silu(z)
    return group_rms_norm(y, norm_w, groups, 1e-5)


@torch.no_grad()
def greedy_generate(model, tok, prompts: list[str], max_new: int, pattern: str, eps: float,
                    batch: int = 64, vocab_limit: int | None = None) -> list[str]:
    """Greedy continuation of each prompt (after <bos>) until <eos> or max_new tokens. `vocab_limit`:
    only the first ids are real tokens (the rest pads the embedding for TP), never emit the others."""
    return [tok.decode(g) for g in greedy_ids(model, tok, prompts, max_new, pattern, eps, batch, vocab_limit)]


@torch.no_grad()
def greedy_ids(model, tok, prompts: list[str], max_new: int, pattern: str, eps: float,
               batch: int = 64, vocab_limit: int | None = None) -> list[list[int]]:
    """The generated ids of greedy_generate (the final <eos> included when one is generated)."""
    with native():  # decoding is all CPU-tensor work here: without the CPU device remap (24 % of a step)
        return _greedy_ids(model, tok, prompts, max_new, pattern, eps, batch, vocab_limit)


def _greedy_ids(model, tok, prompts, max_new, pattern, eps, batch, vocab_limit) -> list[list[int]]:
    out = []
    for start in range(0, len(prompts), batch):
        ids = [[tok.bos_id] + tok.encode(p) for p in prompts[start:start + batch]]
        lens = torch.tensor([len(s) for s in ids])
        longest = int(lens.max())
        prompt = torch.full((len(ids), longest), tok.pad_id)
        for r, s in enumerate(ids):
            prompt[r, :len(s)] = torch.tensor(s)
        dec, gen = CachedDecoder(model, pattern, eps), [[] for _ in ids]
        done = torch.zeros(len(ids), dtype=torch.bool)
        cur = prompt[:, 0]
        for t in range(longest + max_new - 1):
            nxt = dec.step(cur)[:, :vocab_limit].argmax(-1)  # prediction for position t + 1
            generating = (t + 1 >= lens) & ~done  # rows whose prompt is exhausted
            for r in torch.nonzero(generating).flatten().tolist():
                if len(gen[r]) < max_new:
                    gen[r].append(int(nxt[r]))
            done |= generating & ((nxt == tok.eos_id) | torch.tensor([len(g) >= max_new for g in gen]))
            if bool(done.all()):
                break
            cur = torch.where(t + 1 < lens, prompt[:, min(t + 1, longest - 1)], nxt)
        out += gen
    return out
