"""Subnets: nesting (invariant 3) as a property over random subnets, group-aware kept indices."""

from __future__ import annotations

import random

import pytest
import torch

from elastic_megatron.config import ConfigError, load_config
from elastic_megatron.elastic.slicing import ffn_kept, kept_indices, sliced_model_config
from elastic_megatron.elastic.subnet import (
    Subnet,
    check_subnet,
    nest_family,
    resolve_choices,
    subnet_params,
)
from elastic_megatron.model.hybrid import count_parameters

CFG = load_config(None)
M = CFG.model
NAMES = [
    "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_norm.weight",
    *[f"decoder.layers.0.{n}" for n in ("norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight",
                                        "mixer.conv1d.bias", "mixer.A_log", "mixer.D", "mixer.dt_bias",
                                        "mixer.norm.weight", "mixer.out_proj.weight")],
    "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.mlp.linear_fc1.weight",
    "decoder.layers.1.mlp.linear_fc2.weight", "decoder.layers.3.input_layernorm.weight",
    "decoder.layers.3.self_attention.linear_qkv.weight", "decoder.layers.3.self_attention.linear_proj.weight",
]


def random_subnet(rng: random.Random, tp: int = 2) -> Subnet:
    ch = resolve_choices(M, tp, *(getattr(CFG.elastic, a) for a in
                                  ("hidden", "mamba_heads", "mamba_head_dim", "attn_heads", "ffn", "depth")))
    p = M.hybrid_override_pattern
    keep = [rng.random() > 0.25 for _ in p]
    keep[0] = True
    return Subnet(rng.choice(ch.hidden), tuple(rng.choice(ch.mamba_heads) for _ in range(p.count("M"))),
                  tuple(rng.choice(ch.mamba_head_dim) for _ in range(p.count("M"))),
                  tuple(rng.choice(ch.attn_heads) for _ in range(p.count("*"))),
                  tuple(rng.choice(ch.ffn) for _ in range(p.count("-"))), tuple(keep))


def _kept_sets(s: Subnet, name: str, sort_tp: int) -> dict[int, set]:
    return {dim: set(idx.tolist()) for dim, idx in kept_indices(name, s, M, sort_tp).items()}


@pytest.mark.parametrize("sort_tp", [1, 2])
def test_nested_family_keeps_subsets_of_channels_heads_and_layers(sort_tp):
    rng = random.Random(1234 + sort_tp)
    for _ in range(40):
        family = nest_family([random_subnet(rng) for _ in range(3)])
        for small, large in zip(family[1:], family[:-1]):
            assert small.is_within(large)
            assert subnet_params(small, M, 64) <= subnet_params(large, M, 64)
            assert {i for i, k in enumerate(small.keep) if k} <= {i for i, k in enumerate(large.keep) if k}
            for name in NAMES:
                a, b = _kept_sets(small, name, sort_tp), _kept_sets(large, name, sort_tp)
                assert a.keys() == b.keys()
                for dim in a:
                    assert a[dim] <= b[dim], (name, dim)


def test_nest_family_changes_nothing_that_is_already_nested():
    full = Subnet.full(M)
    smaller = Subnet(96, (8,) * 4, (12,) * 4, (4,) * 2, (192,) * 4, (True,) * 10)
    assert nest_family([full, smaller]) == [full, smaller]


def test_mamba_heads_equal_per_group_and_bc_rows_untouched():
    s = Subnet(192, (8, 16, 16, 16), (12, 24, 24, 24), (8, 8), (768,) * 4, (True,) * 10)
    idx = kept_indices("decoder.layers.0.mixer.in_proj.weight", s, M, 1)[0]
    d_in, bc, hpg = M.mamba_num_heads * M.mamba_head_dim, M.mamba_num_groups * M.mamba_state_dim, 4
    heads = kept_indices("decoder.layers.0.mixer.A_log", s, M, 1)[0]
    per_group = torch.bincount(heads // hpg, minlength=M.mamba_num_groups)
    assert per_group.tolist() == [2, 2, 2, 2]  # 8 heads kept = 2 in each of the 4 groups
    bc_rows = torch.arange(2 * d_in, 2 * d_in + 2 * bc)
    assert set(bc_rows.tolist()) <= set(idx.tolist())  # every B/C row kept
    assert len(idx) == 2 * 8 * 12 + 2 * bc + 8
    chans = kept_indices("decoder.layers.0.mixer.norm.weight", s, M, 1)[0]
    per_head = chans.view(len(heads), -1)  # the same 12 head-dim channels of every kept head
    assert torch.equal(per_head - heads[:, None] * M.mamba_head_dim, torch.arange(12).expand(len(heads), 12))


def test_attention_heads_trimmed_inside_each_kv_group_kv_kept():
    s = Subnet(192, (16,) * 4, (24,) * 4, (4, 8), (768,) * 4, (True,) * 10)
    qkv = kept_indices("decoder.layers.3.self_attention.linear_qkv.weight", s, M, 1)[0]
    d, hpg = M.kv_channels, M.num_attention_heads // M.num_query_groups
    block = (hpg + 2) * d  # rows of one KV group: [q_0 .. q_{hpg-1}, k, v]
    for g in range(M.num_query_groups):
        rows = qkv[(qkv >= g * block) & (qkv < (g + 1) * block)] - g * block
        assert rows.tolist() == list(range(d)) + list(range(hpg * d, (hpg + 2) * d))  # q_0, k, v


def test_ffn_kept_is_union_of_per_shard_prefixes():
    assert ffn_kept(4, 8, 2).tolist() == [0, 1, 4, 5]
    assert ffn_kept(4, 8, 1).tolist() == [0, 1, 2, 3]


def test_sliced_config_counts_match_closed_form():
    rng = random.Random(7)
    for _ in range(20):
        s = random_subnet(rng)
        assert count_parameters(sliced_model_config(M, s), 64) == subnet_params(s, M, 64)


def test_invalid_subnets_are_rejected_with_the_field_named():
    full = Subnet.full(M)
    with pytest.raises(ConfigError, match="subnet.mamba_heads"):
        check_subnet(Subnet(192, (6, 16, 16, 16), full.mamba_head_dim, full.attn_heads, full.ffn, full.keep), M)
    with pytest.raises(ConfigError, match="subnet.attn_heads"):
        check_subnet(Subnet(192, full.mamba_heads, full.mamba_head_dim, (3, 8), full.ffn, full.keep), M)
    with pytest.raises(ConfigError, match="subnet.ffn"):
        check_subnet(Subnet(192, full.mamba_heads, full.mamba_head_dim, full.attn_heads, (767, 768, 768, 768),
                            full.keep), M, tp=2)
    with pytest.raises(ConfigError, match="elastic.mamba_heads"):
        resolve_choices(M, 1, [1.0], [0.3], [1.0], [1.0], [1.0], [1.0])  # 0.3 * 16 = 5: not a multiple of 4 groups


def test_homogeneous_baseline_hits_the_target_and_is_balanced():
    from elastic_megatron.config import load_config
    from elastic_megatron.elastic.subnet import Subnet, homogeneous_for_target, subnet_params

    m = load_config(None).model
    full = subnet_params(Subnet.full(m), m, 64)
    for frac in (0.75, 0.6, 0.5):
        s = homogeneous_for_target(m, 64, frac * full)
        assert abs(subnet_params(s, m, 64) / (frac * full) - 1) <= 0.01
        assert len(set(s.ffn)) == len(set(s.mamba_heads)) == len(set(s.attn_heads)) == 1 and all(s.keep)
        fr = [s.hidden / m.hidden_size, s.mamba_heads[0] / m.mamba_num_heads,
              s.attn_heads[0] / m.num_attention_heads, s.ffn[0] / m.ffn_hidden_size]
        assert max(fr) - min(fr) <= 0.5  # no axis carries the whole cut
