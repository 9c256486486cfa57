"""Router and cost: exact closed forms, budget-loss convergence, deterministic noise, straight-through gates."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from elastic_megatron.config import ConfigError, load_config
from elastic_megatron.elastic.cost import (expected_memory, expected_params, resolve_budgets, smallest_subnet,
                                           subnet_cost, subnet_memory, subnet_tensors)
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
    _, m, _ = tiny()
    a = Subnet.full(m)
    b = dataclasses.replace(a, ffn=(192,) * 4)
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


def tiny_router(budgets=("1.0", "0.75", "0.5"), layer_order=None, seed=0, cost="params") -> RouterSet:
    cfg, _, _ = tiny()
    cfg.router.cost, cfg.router.memory_seq_length = cost, 256
    cfg.elastic.budgets = list(budgets)  # set after validation: other sections size themselves by the budgets
    return build_router(cfg, VOCAB, layer_order=layer_order, seed=seed)


def one_hot_probs(rs: RouterSet, rng: random.Random) -> dict[str, torch.Tensor]:
    """Random exact 0/1 probabilities in every router's output shape."""
    out = {}
    for a, z in rs.logits(0).items():
        idx = torch.tensor([rng.randrange(z.shape[-1]) for _ in range(z.numel() // z.shape[-1])]).view(z.shape[:-1])
        out[a] = torch.nn.functional.one_hot(idx, z.shape[-1]).float()
    return out


def test_router_shapes_heterogeneous_and_homogeneous():
    rs = tiny_router()
    z = rs.logits(1)
    assert z["hidden"].shape == (5,) and z["depth"].shape == (3,) and z["mamba_head_dim"].shape == (3,)
    assert z["ffn"].shape == (4, 4) and z["mamba_heads"].shape == (4, 3) and z["attn_heads"].shape == (2,)
    assert all(p.dtype == torch.float32 for p in rs.parameters())
    assert router_optimizer(rs, load_config(None).router).param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("cost", ["params", "memory"])
def test_decision_cost_matches_its_subnet_for_one_hot_probs(cost):
    """expected_cost of 0/1 probabilities == the exact cost of the decided subnet (sizes, depth via layer_order)."""
    order = [3, 0, 7, 1, 9, 2, 8, 4, 6, 5]
    rs = tiny_router(layer_order=order, cost=cost)
    r, rng = rs.rcfg, random.Random(1)
    for _ in range(20):
        d = rs.decide(one_hot_probs(rs, rng), budget_idx=1)
        check_subnet(d.subnet, rs.m)
        kept = [i for i in range(10) if d.subnet.keep[i]]
        assert sorted(order[:len(kept)]) == kept  # the most important layers are kept first
        exact = subnet_cost(d.subnet, rs.m, VOCAB, cost, r.memory_seq_length, r.memory_batch_size, r.bytes_per_param)
        assert float(d.expected_cost) == float(exact)
        assert torch.equal(d.layer_gates, torch.ones(10))


def test_budget_loss_alone_reaches_every_target():
    """Budget loss only (lambda=1, Adam lr 1e-2, tau 1->0.05, scale 1->10): expected params within 2%.

    Each step draws 4 micro-batches per budget (own Gumbel noise each, shared router pass), as a
    training step with several micro-batches would. Measured (seed 0, 1000 steps): see the report."""
    budgets = ("1.0", "0.75", "0.6", "0.5")
    rs = tiny_router(budgets)
    opt = router_optimizer(rs, rs.rcfg)
    steps, micros = 1000, 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    try:
        for step in range(steps):
            loss = 0.0
            for b in range(len(budgets)):
                z = rs.logits(b)
                for k in range(micros):
                    loss = loss + rs.draw(z, b, step, steps, seed=1, micro=k, hard=False).budget_loss / micros
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    rows = []
    with torch.no_grad():
        for b, target in enumerate(rs.targets):
            draws = [rs(b, steps - 1, steps, seed=99, micro=k).expected_cost for k in range(16)]
            expected = float(torch.stack(draws).mean())
            argmax = subnet_params(rs.inference(b), rs.m, VOCAB)
            rows.append((budgets[b], int(target), expected / target, argmax / target))
    report = "\n".join(f"budget {n}: target {t:,}  expected/target {e:.4f}  argmax/target {a:.4f}"
                       for n, t, e, a in rows)
    print(report)
    assert all(abs(e - 1) <= 0.02 for _, _, e, _ in rows), report
    assert all(abs(a - 1) <= 0.10 for _, _, _, a in rows), report


def test_noise_is_deterministic_per_seed_step_micro_budget_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    rs = tiny_router(seed=5)
    again = tiny_router(seed=5)
    assert all(torch.equal(p, q) for p, q in zip(rs.parameters(), again.parameters()))
    a = rs(2, step=3, total_steps=10, seed=11, micro=1)
    b = rs(2, step=3, total_steps=10, seed=11, micro=1)
    assert a.subnet == b.subnet and all(torch.equal(a.probs[k], b.probs[k]) for k in a.probs)
    for other in (dict(micro=2), dict(step=4), dict(seed=12)):
        kw = {"step": 3, "seed": 11, "micro": 1, **other}
        c = rs(2, total_steps=10, **kw)
        assert not torch.equal(a.probs["ffn"], c.probs["ffn"]), other
    shared = rs.logits(1)  # draw() from shared logits == forward(); micro still changes the noise
    assert torch.equal(rs(1, 3, 10, 11, micro=1).probs["ffn"], rs.draw(shared, 1, 3, 10, 11, micro=1).probs["ffn"])
    assert not torch.equal(rs(1, 3, 10, 11, micro=1).probs["ffn"], rs.draw(shared, 1, 3, 10, 11, micro=2).probs["ffn"])
    assert noise_seed(1, 2, 3, 4) != noise_seed(1, 2, 4, 3)
    assert torch.equal(torch.get_rng_state(), state)  # neither building nor drawing touched the global RNG
    assert rs.inference(1) == rs.inference(1)
    check_subnet(rs.inference(1), rs.m)


def test_gates_are_exactly_one_with_the_chosen_probability_gradient():
    rs = tiny_router()
    d = rs(1, step=2, total_steps=10, seed=3)
    assert torch.equal(d.layer_gates, torch.ones(10)) and d.layer_gates.requires_grad
    for layer, (kind, k) in enumerate(rs.slots):
        rs.zero_grad()
        d.layer_gates[layer].backward(retain_graph=True)
        reached = {a for a, r in rs.routers.items()
                   if r.fc2.weight.grad is not None and r.fc2.weight.grad.abs().sum() > 0}
        want = {"M": {"mamba_heads", "mamba_head_dim"}, "*": {"attn_heads"}, "-": {"ffn"}}[kind] | {"hidden", "depth"}
        assert reached == want, (layer, kind, reached)
        # d gate = d log p, p = product of the layer's chosen probabilities
        p = d.chosen_prob["hidden"] * d.chosen_prob["depth"]
        for a in want - {"hidden", "depth"}:
            p = p * rs.per_layer(a, d.chosen_prob[a])[k]
        w = rs.routers["hidden"].fc1.weight
        g_gate = torch.autograd.grad(d.layer_gates[layer], w, retain_graph=True)[0]
        g_logp = torch.autograd.grad(torch.log(p), w, retain_graph=True)[0]
        torch.testing.assert_close(g_gate, g_logp)
    soft = rs(1, step=2, total_steps=10, seed=3, hard=False)
    assert torch.equal(soft.layer_gates, torch.ones(10)) and not soft.layer_gates.requires_grad


def test_soft_masks_are_probability_weighted_group_prefixes():
    m = load_config(None).model
    assert prefix_masks(8, [8, 4], groups=4).tolist() == [[1.0] * 8, [1, 0, 1, 0, 1, 0, 1, 0]]
    rs = tiny_router()
    rng = random.Random(2)
    d = rs.decide(one_hot_probs(rs, rng), 0)
    masks = rs.soft_masks(d)
    s = d.subnet
    assert masks["hidden"].sum() == s.hidden and masks["depth"].tolist() == [float(k) for k in s.keep]
    per_group = m.mamba_num_heads // m.mamba_num_groups
    for k, heads in enumerate(s.mamba_heads):  # the first heads/groups heads of every group
        want = [float(j % per_group < heads // m.mamba_num_groups) for j in range(m.mamba_num_heads)]
        assert masks["mamba_heads"][k].tolist() == want
    assert masks["ffn"].sum(-1).tolist() == [float(f) for f in s.ffn]
    assert masks["attn_heads"].shape == (2, m.num_attention_heads)
    # a 50/50 mixture of two hidden choices gives 1 on the common prefix and 0.5 on the rest
    probs = {**d.probs, "hidden": torch.tensor([0.5, 0.0, 0.0, 0.0, 0.5])}
    h = rs.soft_masks(rs.decide(probs, 0))["hidden"]
    assert h[:96].eq(1).all() and h[96:].eq(0.5).all()


def test_all_reduce_router_grads_is_a_noop_without_distributed():
    rs = tiny_router()
    rs(0).budget_loss.backward()
    before = [p.grad.clone() for p in rs.parameters()]
    all_reduce_router_grads(rs)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, rs.parameters()))
