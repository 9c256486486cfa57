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

    assert load_config(None).elastic.deploy_candidates == 13
    for key in ("elastic.deploy_candidates=0", "elastic.deploy_calibration_samples=-1", "elastic.deploy_metric=acc"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(None, [key])
    # exact match needs problems with reference solutions: the synthetic corpus
    with pytest.raises(ConfigError, match="elastic.deploy_metric.*synthetic"):
        load_config(None, ["elastic.deploy_metric=exact", "data.source=indexed", "data.paths=[/x]"])
    with pytest.raises(ConfigError, match="elastic.deploy_metric.*synthetic"):
        load_config(None, ["elastic.deploy_metric=solution", "data.source=indexed", "data.paths=[/x]"])
    # the search scores on every layout now (train/deploy_score.py): pipeline runs are not refused
    assert load_config(None, ["elastic.deploy_candidates=4", "parallel.pipeline=2"]).elastic.deploy_candidates == 4


def test_problem_rows_mark_the_solution_and_eos():
    """Each row is one held-out (valid split) problem, <bos> prompt solution <eos>; the solution mask
    covers exactly the labels greedy decoding must write, and a problem too long for the row is cut
    and flagged (it counts as missed)."""
    from elastic_megatron.config import load_config
    from elastic_megatron.data.synthetic import split_of
    from elastic_megatron.data.tokenizer import load_tokenizer
    from elastic_megatron.train.deploy_score import problem_rows

    cfg, tok = load_config(None), load_tokenizer("char")
    rows = problem_rows(cfg, tok, 6, 128)
    assert rows["tokens"].shape == rows["labels"].shape == rows["solution"].shape == (6, 128)
    assert torch.equal(rows["tokens"][:, 1:], rows["labels"][:, :-1])
    for i in range(6):
        ids = rows["tokens"][i].tolist()
        assert ids[0] == tok.bos_id
        text = tok.decode(ids[1:])
        prompt = text[:text.index("\n") + 1]
        assert split_of(prompt) == "valid"
        marked = rows["labels"][i][rows["solution"][i] > 0].tolist()
        assert marked[-1] == tok.eos_id and tok.decode(marked[:-1]) == text[len(prompt):text.index("a: ")] + \
            text[text.index("a: "):].split("\n")[0]
        assert not rows["cut"][i]
        assert int(rows["length"][i]) == int(rows["solution"][i].nonzero().max()) + 1  # through <eos>
    short = problem_rows(cfg, tok, 6, 24)  # 2-3-step problems take 35-96 tokens: every one is cut
    assert bool(short["cut"].all())


def test_exact_stats_count_problems_whose_every_solution_token_is_the_argmax():
    """Teacher-forced exact match: a problem counts only when the label is the argmax at every
    solution position (prompt positions do not matter), padding rows count as no problem, and the
    solution loss is the CE over solution tokens only."""
    from elastic_megatron.config import load_config
    from elastic_megatron.parallel import (
        ParallelLayout,
        destroy_distributed,
        init_distributed,
    )
    from elastic_megatron.train.deploy_score import _exact_stats

    init_distributed(ParallelLayout.resolve(load_config(None), 1), 0)
    try:
        b, s, v = 4, 6, 11
        labels = torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(0))
        logits = torch.randn(b, s, v, generator=torch.Generator().manual_seed(1))
        logits.scatter_(-1, labels[..., None], 10.0)  # every label is the argmax ...
        sol = torch.zeros(b, s)
        sol[:3, 2:5] = 1.0  # rows 0-2 hold a problem with a 3-token solution; row 3 pads the batch
        logits[1, 3, (labels[1, 3] + 1) % v] = 20.0  # ... except one solution token of row 1
        logits[2, 0, (labels[2, 0] + 1) % v] = 20.0  # and one prompt token of row 2 (does not count)
        batch = {"labels": labels, "solution": sol, "cut": torch.tensor([False, False, False, False])}
        _, out = _exact_stats(batch, logits)
        problems, right, ce, tokens = out["stats"].tolist()
        assert (problems, right, tokens) == (3, 2, 9)
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none")
        assert ce == pytest.approx(float((ref.reshape(b, s) * sol).sum()), rel=1e-6)
        batch["cut"] = torch.tensor([True, False, False, False])  # a cut problem is a miss
        assert _exact_stats(batch, logits)[1]["stats"][1] == 1
    finally:
        destroy_distributed()


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


def test_score_tuple_orders_proposals_by_the_chosen_metric():
    from elastic_megatron.train.deploy_score import score_tuple

    # (problems, right, solution loss): a has more right, b the lower loss
    a, b = (64, 20, 0.30), (64, 18, 0.25)
    assert score_tuple("exact", *a) < score_tuple("exact", *b)  # fewest misses first
    assert score_tuple("solution", *b) < score_tuple("solution", *a)  # lowest solution loss first
    # solution: losses equal to 1e-3 fall back to misses (summation-order noise is ~1e-7)
    assert score_tuple("solution", 64, 20, 0.30004) < score_tuple("solution", 64, 18, 0.30001)
    assert score_tuple("exact", 64, 20, 0.31) < score_tuple("exact", 64, 20, 0.32)  # ties: loss
    assert score_tuple("loss", *b) < score_tuple("loss", *a)
