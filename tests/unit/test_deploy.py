"""The deployed family (elastic/deploy.py): on budget, nested, the router's preference otherwise."""

from __future__ import annotations

import pytest
import torch

from elastic_megatron.elastic.deploy import deployed_family, deployed_subnet
from tests.unit.test_router import tiny_router

BUDGETS = ("1.0", "0.75", "0.6", "0.5")


def _randomize(rs, seed: int) -> None:
    """Router logits far from any budget: a random, confident router (the worst case for the argmax)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deployed_family_is_on_budget_and_nested(seed):
    rs = tiny_router(BUDGETS)
    _randomize(rs, seed)
    fixed = rs.fixed_subnets()
    family = deployed_family(rs, fixed, 0.02)
    argmax_off = []
    for b, (s, target) in enumerate(zip(family, rs.targets)):
        cost = rs.cost_of(s)
        assert abs(cost / target - 1) <= 0.02, (b, cost, target)
        argmax_off.append(abs(rs.cost_of(rs.inference(b)) / target - 1))
    assert family[0] == fixed[0]  # the full budget is the parent itself
    assert all(small.is_within(big) for big, small in zip(family, family[1:]))
    assert max(argmax_off) > 0.02, "the random router already lands on budget: the test shows nothing"


def test_deployed_subnet_starts_from_the_router_choice():
    """A router whose argmax is on budget deploys exactly its argmax (the projection only moves it
    when it must); tolerance 0 means the plain argmax."""
    rs = tiny_router(BUDGETS)
    _randomize(rs, 0)
    for b in range(1, len(BUDGETS)):
        argmax = rs.inference(b)
        rs.targets[b] = float(rs.cost_of(argmax))  # make the argmax exactly on target
        assert deployed_subnet(rs, b, None, 0.02) == argmax
    family = deployed_family(rs, rs.fixed_subnets(), 0.0)
    assert family[1] == rs.inference(1)  # (the smaller ones are the argmax clipped inside it)


def test_deployed_family_is_deterministic_and_keeps_hand_picked_subnets():
    rs = tiny_router(BUDGETS)
    _randomize(rs, 3)
    fixed = rs.fixed_subnets()
    small = deployed_family(rs, fixed, 0.02)[3]
    fixed[2] = small  # a hand-picked 0.6 (smaller than its target): kept as given, the 0.5 nests inside it
    a, b = deployed_family(rs, fixed, 0.02), deployed_family(rs, fixed, 0.02)
    assert a == b and a[2] == small and a[3].is_within(small)
