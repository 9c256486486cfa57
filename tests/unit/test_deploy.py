"""The deployed family (elastic/deploy.py): on budget, nested, the router's preference otherwise."""

from __future__ import annotations

import pytest
import torch

from elastic_megatron.elastic.deploy import (
    deployed_candidates,
    deployed_family,
    deployed_subnet,
)
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_candidates_are_on_budget_nested_distinct_and_start_with_the_router_choice(seed):
    """The proposals `deployed_family` scores (issue 23): the router's deployed subnet first, then
    one-axis-cut alternatives, each within 2 % of target, inside the larger budget's subnet, distinct."""
    rs = tiny_router(BUDGETS)
    _randomize(rs, seed)
    cap = deployed_family(rs, rs.fixed_subnets(), 0.02)[1]  # the 0.75 model
    for b in (2, 3):
        cands = deployed_candidates(rs, b, cap, 0.02, 6)
        assert cands[0] == deployed_subnet(rs, b, cap, 0.02)
        assert len(cands) >= 2, "no alternative proposal: the search has nothing to choose from"
        assert len(set(cands)) == len(cands)
        for s in cands:
            assert abs(rs.cost_of(s) / rs.targets[b] - 1) <= 0.02, (b, rs.cost_of(s), rs.targets[b])
            assert s.is_within(cap)
        assert len(deployed_candidates(rs, b, cap, 0.02, 1)) == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_family_deploys_the_lowest_scored_proposal_and_stays_nested(seed):
    """With a score, each budget deploys its lowest-scoring proposal (here: a score that dislikes the
    router's own choice), chosen inside the larger budget's chosen subnet, every budget on target."""
    rs = tiny_router(BUDGETS)
    _randomize(rs, seed)
    fixed = rs.fixed_subnets()
    plain = deployed_family(rs, fixed, 0.02)
    dislike = set(plain[1:])
    # prefer anything the router did not pick; among those, the one keeping the most layers/hidden
    score = lambda s: (s in dislike) * 10.0 - sum(s.keep) - s.hidden / 1e4
    family = deployed_family(rs, fixed, 0.02, score, 4)
    assert family[0] == fixed[0]
    assert family[1:] != plain[1:], "the score did not change the choice: the selection is not wired"
    assert all(small.is_within(big) for big, small in zip(family, family[1:]))
    for b, s in enumerate(family):
        assert abs(rs.cost_of(s) / rs.targets[b] - 1) <= 0.02
        if b:
            assert s == min(deployed_candidates(rs, b, family[b - 1], 0.02, 4), key=score)
    assert deployed_family(rs, fixed, 0.02, score, 1) == plain  # k = 1: the router's subnet only


def test_deploy_candidates_is_validated():
    from elastic_megatron.config import ConfigError, load_config

    assert load_config(None).elastic.deploy_candidates == 1
    for key in ("elastic.deploy_candidates=0", "elastic.deploy_calibration_samples=0"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(None, [key])
    # a pipeline run cannot score proposals, and must deploy what the one-process run deploys
    with pytest.raises(ConfigError, match="elastic.deploy_candidates.*parallel.pipeline=1"):
        load_config(None, ["elastic.deploy_candidates=4", "parallel.pipeline=2"])
    assert load_config(None, ["elastic.deploy_candidates=4", "parallel.tensor=2"]).elastic.deploy_candidates == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_candidates_also_move_an_axis_above_the_router_choice(seed):
    """Proposals go both ways: `raise_` keeps one axis a step above the router's mode on every row
    (saving the budget elsewhere), and those proposals are among the candidates, so a mode that cut
    one axis too far can be corrected."""
    rs = tiny_router(BUDGETS)
    _randomize(rs, seed)
    cap = deployed_family(rs, rs.fixed_subnets(), 0.02)[1]

    def sizes(s, axis):
        d = s.to_dict()
        return [sum(d["keep"])] if axis == "depth" else [d["hidden"]] if axis == "hidden" else list(d[axis])

    raised = 0
    for b in (2, 3):
        first = deployed_subnet(rs, b, cap, 0.02)
        cands = deployed_candidates(rs, b, cap, 0.02, 64)
        for axis in rs.logits(b):
            up = deployed_subnet(rs, b, cap, 0.02, raise_=axis)
            if up is None or not 0.98 <= rs.cost_of(up) / rs.targets[b] <= 1.02 or up == first:
                continue
            assert sum(sizes(up, axis)) > sum(sizes(first, axis)), (axis, up, first)
            assert up in cands
            raised += 1
    assert raised, "no axis could be raised: the test checks nothing"
