"""Router and cost: exact closed forms, budget-loss convergence, deterministic noise, straight-through gates."""

from __future__ import annotations

import random

import pytest
import torch

from elastic_megatron.config import ConfigError, load_config
from elastic_megatron.elastic.cost import (expected_memory, expected_params, resolve_budgets, smallest_subnet,
                                           subnet_memory, subnet_tensors)
from elastic_megatron.elastic.router import (RouterSet, all_reduce_router_grads, build_router, noise_seed,
                                             prefix_masks, router_optimizer)
from elastic_megatron.elastic.subnet import Subnet, check_subnet, resolve_choices, subnet_params

VOCAB = 64


def tiny():
    cfg = load_config(None)
    e = cfg.elastic
    choices = resolve_choices(cfg.model, 1, e.hidden, e.mamba_heads, e.mamba_head_dim, e.attn_heads, e.ffn, e.depth)
    return cfg, cfg.model, choices


def random_subnet(m, choices, rng: random.Random) -> Subnet:
    p = m.hybrid_override_pattern
    keep = [rng.random() < 0.8 for _ in p]
    keep[rng.randrange(len(p))] = True
    return Subnet(rng.choice(choices.hidden), tuple(rng.choice(choices.mamba_heads) for _ in range(p.count("M"))),
                  tuple(rng.choice(choices.mamba_head_dim) for _ in range(p.count("M"))),
                  tuple(rng.choice(choices.attn_heads) for _ in range(p.count("*"))),
                  tuple(rng.choice(choices.ffn) for _ in range(p.count("-"))), tuple(keep))


# --------------------------------------------------------------------------- cost


def test_expected_params_equals_subnet_params_on_random_subnets():
    _, m, choices = tiny()
    rng = random.Random(0)
    for _ in range(30):
        s = random_subnet(m, choices, rng)
        check_subnet(s, m)
        assert float(expected_params(m, VOCAB, *subnet_tensors(s))) == float(subnet_params(s, m, VOCAB))
        kw = dict(seq_length=128, batch_size=3, bytes_per_param=2)
        assert float(expected_memory(m, VOCAB, *subnet_tensors(s), **kw)) == float(subnet_memory(s, m, VOCAB, **kw))
    full = Subnet.full(m)
    assert float(expected_params(m, VOCAB, *subnet_tensors(full))) == subnet_params(full, m, VOCAB)


def test_expected_params_is_the_mean_over_two_subnets():
    """Linear in each independent size: a 50/50 mix of two ffn choices costs the mean."""
    _, m, choices = tiny()
    a, b = Subnet.full(m), Subnet.full(m).__class__(**{**Subnet.full(m).__dict__, "ffn": (192,) * 4})
    h, mh, md, at, _, keep = subnet_tensors(a)
    mixed = expected_params(m, VOCAB, h, mh, md, at, torch.full((4,), (768 + 192) / 2, dtype=torch.float64), keep)
    assert float(mixed) == (subnet_params(a, m, VOCAB) + subnet_params(b, m, VOCAB)) / 2


def test_subnet_memory_formula_by_hand():
    _, m, _ = tiny()
    s = Subnet.full(m)
    S, B, b = 100, 2, 2
    kv = 2 * m.num_query_groups * m.kv_channels * S * B * b * 2  # two attention layers
    d_in = m.mamba_num_heads * m.mamba_head_dim
    state = ((d_in + 2 * m.mamba_num_groups * m.mamba_state_dim) * 3 + d_in * m.mamba_state_dim) * B * b * 4
    assert subnet_memory(s, m, VOCAB, S, B, b) == subnet_params(s, m, VOCAB) * b + kv + state


def test_resolve_budgets():
    assert resolve_budgets(["1.0", "0.5", "900K"], 2_000_000) == [2_000_000, 1_000_000, 900_000]
    with pytest.raises(ConfigError, match="elastic.budgets.*exceeds"):
        resolve_budgets(["3M"], 2_000_000)
    with pytest.raises(ConfigError, match="elastic.budgets.*smallest"):
        resolve_budgets(["0.1"], 2_000_000, min_params=500_000)
    cfg = load_config(None, ["elastic.budgets=[1.0,0.05]", "curriculum.1.budget_probs=[0.5,0.5]"])
    with pytest.raises(ConfigError, match="elastic.budgets"):
        build_router(cfg, VOCAB)


def test_smallest_subnet_follows_layer_order():
    _, m, choices = tiny()
    s = smallest_subnet(m, choices, layer_order=list(range(9, -1, -1)))
    assert s.keep == (False, False) + (True,) * 8 and s.hidden == 96 and s.ffn == (192,) * 4


# --------------------------------------------------------------------------- router
