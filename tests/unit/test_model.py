"""The hybrid parent on one CPU process: shapes, closed-form size, causality, TP sharding rules."""

from __future__ import annotations

import os

import pytest
import torch

from elastic_megatron import compat
from elastic_megatron.config import load_config
from elastic_megatron.model import sharding


@pytest.fixture(scope="module")
def parent():
    os.environ.setdefault("MASTER_PORT", str(29900 + os.getpid() % 90))
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

    cfg = load_config(None)
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    model = build_model(cfg, layout, vocab_size=64, dtype=torch.float32).eval()
    yield cfg, model
    destroy_distributed()


def test_parameter_count_closed_form_matches_megatron(parent):
    from elastic_megatron.model.hybrid import count_parameters

    cfg, model = parent
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model, 64)


def test_layer_types_follow_the_pattern(parent):
    cfg, model = parent
    kinds = {"M": "MambaLayer", "*": "TransformerLayer", "-": "MLPLayer"}
    got = [type(layer).__name__ for layer in model.decoder.layers]
    assert got == [kinds[c] for c in cfg.model.hybrid_override_pattern]


@torch.no_grad()
def test_model_is_causal(parent):
    """Changing a later token must not change any earlier logit (Mamba conv/scan and attention)."""
    _, model = parent
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 40), generator=g)
    pos = torch.arange(40).expand(2, 40)
    base = model(tokens, pos, None)
    changed = tokens.clone()
    changed[:, 25:] = (changed[:, 25:] + 7) % 64
    out = model(changed, pos, None)
    assert torch.allclose(out[:, :25], base[:, :25], atol=1e-6)
    assert not torch.allclose(out[:, 25:], base[:, 25:], atol=1e-3)


def test_init_depends_only_on_seed_and_name():
    m = load_config(None).model
    a = sharding.init_full("decoder.layers.3.mlp.linear_fc1.weight", [8, 4], m, seed=1)
    b = sharding.init_full("decoder.layers.3.mlp.linear_fc1.weight", [8, 4], m, seed=1)
    c = sharding.init_full("decoder.layers.4.mlp.linear_fc1.weight", [8, 4], m, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name,rows", [
    ("decoder.layers.0.mixer.in_proj.weight", None),
    ("decoder.layers.0.mixer.conv1d.weight", None),
    ("decoder.layers.1.mlp.linear_fc2.weight", None),
    ("embedding.word_embeddings.weight", None),
])
def test_shard_unshard_round_trip(name, rows):
    m = load_config(None).model
    d_inner, bc = m.mamba_num_heads * m.mamba_head_dim, m.mamba_num_groups * m.mamba_state_dim
    shape = {"in_proj": [2 * d_inner + 2 * bc + m.mamba_num_heads, 6], "conv1d": [d_inner + 2 * bc, 1, 4],
             "linear_fc2": [6, m.ffn_hidden_size], "word_embeddings": [64, 6]}
    full = torch.randn(next(v for k, v in shape.items() if k in name))
    pieces = [sharding.shard(name, full, r, 2, m) for r in range(2)]
    assert torch.equal(sharding.unshard(name, pieces, m), full)


def test_in_proj_is_sharded_block_wise():
    """Each TP rank holds its own half of z, x, B, C and dt, not the first half of the rows."""
    m = load_config(None).model
    d_inner, bc, h = m.mamba_num_heads * m.mamba_head_dim, m.mamba_num_groups * m.mamba_state_dim, m.mamba_num_heads
    sizes = [d_inner, d_inner, bc, bc, h]
    full = torch.cat([torch.full((n, 1), float(i)) for i, n in enumerate(sizes)])
    piece = sharding.shard("decoder.layers.0.mixer.in_proj.weight", full, 1, 2, m)
    expected = torch.cat([torch.full((n // 2, 1), float(i)) for i, n in enumerate(sizes)])
    assert torch.equal(piece, expected)


def test_unknown_parameter_has_no_silent_rule():
    with pytest.raises(KeyError, match="no tensor-parallel rule"):
        sharding.split_rule("decoder.layers.0.something_new.weight")


def test_cpu_shims_remap_cuda_devices_and_rng_tracker():
    compat.install()
    if torch.cuda.is_available():
        pytest.skip("the CPU shims are only installed without CUDA")
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    t = torch.zeros(3, device="cuda")
    assert t.device.type == "cpu" and t.cuda() is t
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"  # megatron's optimizer asserts this
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-state", 123)
    before = torch.get_rng_state()
    with tracker.fork("test-state"):
        x = torch.rand(4)
    with tracker.fork("test-state"):
        y = torch.rand(4)
    assert not torch.equal(x, y)  # the forked stream advances
    assert torch.equal(torch.get_rng_state(), before)  # and leaves the default stream alone
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), x)  # a fork is exactly torch's generator seeded with 123
