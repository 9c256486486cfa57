"""Cached decoding: step-by-step logits equal the full forward, and batched greedy generation with
prompts of different lengths equals the uncached, one-prompt-at-a-time reference."""

from __future__ import annotations

import os

import pytest
import torch

from elastic_megatron.config import load_config

HETERO = ["model.hidden_size=160", "model.layer_ffn_hidden_sizes=[512,256,768,128]",
          "model.layer_mamba_num_heads=[8,12,16,4]", "model.layer_mamba_head_dims=[24,16,24,8]",
          "model.layer_num_attention_heads=[4,8]"]


@pytest.fixture(scope="module")
def dist():
    os.environ.setdefault("MASTER_PORT", str(29800 + os.getpid() % 90))
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

    cfg = load_config(None)
    init_distributed(ParallelLayout.resolve(cfg, 1), cfg.train.seed)
    yield
    destroy_distributed()


def _model(overrides):
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout

    cfg = load_config(None, overrides)
    model = build_model(cfg, ParallelLayout.resolve(cfg, 1), vocab_size=64, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from init, so that every state and gate matters
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith(("D", "dt_bias", "bias")):
                p.add_(0.15 * torch.randn(p.shape, generator=g))
    return cfg, model


@pytest.mark.parametrize("overrides", [[], HETERO], ids=["parent", "heterogeneous"])
def test_cached_steps_equal_the_full_forward(dist, overrides):
    from elastic_megatron.inference import CachedDecoder

    cfg, model = _model(overrides)
    tokens = torch.randint(0, 64, (3, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens, torch.arange(70).expand(3, 70), None)  # [b, s, V]
    dec = CachedDecoder(model, cfg.model.hybrid_override_pattern, cfg.model.norm_epsilon)
    steps = torch.stack([dec.step(tokens[:, t]) for t in range(70)], dim=1)
    assert full.abs().max() > 1.0  # logits far from uniform: the comparison means something
    assert (steps - full).abs().max() < 1e-4


def test_batched_generation_equals_uncached_reference(dist):
    from elastic_megatron.data.tokenizer import CharTokenizer
    from elastic_megatron.inference import greedy_generate

    cfg, model = _model([])
    tok = CharTokenizer()
    prompts = ["q: 3+4*2=?\n", "q: sort [5,2,7,1]\n", "q: 9-1=?\n"]
    got = greedy_generate(model, tok, prompts, 25, cfg.model.hybrid_override_pattern, cfg.model.norm_epsilon)
    for prompt, text in zip(prompts, got):
        x = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
        new = []
        with torch.no_grad():
            for _ in range(25):
                nxt = int(model(x, torch.arange(x.shape[1])[None], None)[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_id:
                    break
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
        assert text == tok.decode(new)


def test_attention_step_matches_full_attention_across_cache_blocks():
    """The block-grown KV cache and the grouped SDPA call give what attention over the whole prefix
    with K, V repeated per query head gives, past the first block (KV_BLOCK positions)."""
    import torch.nn.functional as F

    from elastic_megatron.inference import KV_BLOCK, attention_step

    torch.manual_seed(0)
    b, G, a, d, T = 2, 2, 3, 8, KV_BLOCK + 5
    q, k, v = torch.randn(T, b, G, a, d), torch.randn(T, b, G, 1, d), torch.randn(T, b, G, 1, d)
    state = None
    for t in range(T):
        ctx, state = attention_step(state, q[t], k[t], v[t])
        if t in (0, KV_BLOCK - 1, KV_BLOCK, T - 1):
            keys = k[:t + 1, :, :, 0].permute(1, 2, 0, 3).repeat_interleave(a, dim=1)  # [b, G*a, t+1, d]
            vals = v[:t + 1, :, :, 0].permute(1, 2, 0, 3).repeat_interleave(a, dim=1)
            ref = F.scaled_dot_product_attention(q[t].reshape(b, G * a, 1, d), keys, vals)
            torch.testing.assert_close(ctx, ref.reshape(b, G * a * d), rtol=1e-5, atol=1e-6)
    assert state[2] == T and state[0].shape[2] == 2 * KV_BLOCK
