"""Budget sampling: configured frequencies, identical on every rank (a pure function of seed/step/micro)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elastic_megatron.config import ConfigError, load_config
from elastic_megatron.train.elastic_loop import draw_budget, stage_probs


@pytest.mark.parametrize("probs", [[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.0, 0.3]])
def test_budget_frequencies_match_configured_probabilities(probs):
    draws = [draw_budget(probs, seed=1234, step=s, micro=m) for s in range(1000) for m in range(3)]
    assert len(draws) == 3000
    for b, p in enumerate(probs):
        freq = draws.count(b) / len(draws)
        assert abs(freq - p) <= 0.03, (b, freq, p)


def test_draws_are_identical_in_another_process():
    """Another interpreter (another rank) draws exactly the same budgets."""
    code = ("from elastic_megatron.train.elastic_loop import draw_budget;"
            "print([draw_budget([0.5,0.3,0.2], 7, s, m) for s in range(50) for m in range(4)])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    here = str([draw_budget([0.5, 0.3, 0.2], 7, s, m) for s in range(50) for m in range(4)])
    assert other == here and len(set(eval(here))) == 3


def test_default_curriculum_follows_the_paper():
    cfg = load_config(None)
    short, long_ = cfg.curriculum
    assert stage_probs(short, 3) == [1 / 3] * 3  # stage 1: uniform budgets
    assert long_.budget_probs == [0.5, 0.3, 0.2]  # stage 2: weighted to the largest model
    assert long_.seq_length == 6 * cfg.data.seq_length  # ~6x longer context


def test_bad_stage_probabilities_are_rejected():
    with pytest.raises(ConfigError, match="curriculum.1.budget_probs"):
        load_config(None, ["curriculum.1.budget_probs=[0.5,0.5]"])


@pytest.mark.parametrize("probs", [[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.0, 0.3], [0.45, 0.55]])
def test_stratified_sampling_gives_every_window_its_exact_share(probs):
    """budget_sampling=stratified: each window of 10 x budgets micro-batches holds every budget
    round(p x window) times, so no seed can starve a budget for a stretch of training."""
    from elastic_megatron.train.elastic_loop import stratified_budget

    n = 10 * len(probs)
    orders = set()
    for seed in (1, 1234):
        for w in range(5):
            window = [stratified_budget(probs, seed, w * n + i) for i in range(n)]
            assert [window.count(b) for b in range(len(probs))] == [round(p * n) for p in probs]
            orders.add(tuple(window))
    assert len(orders) == 10  # a fresh order in every window and seed: not a fixed cycle


def test_stratified_draws_do_not_depend_on_the_layout():
    """The slot is the micro-batch's index in the stage's global batch order, the same whatever the
    DP / micro-batch split, and another interpreter (another rank) computes the same budgets."""
    from elastic_megatron.train.elastic_loop import stratified_budget

    code = ("from elastic_megatron.train.elastic_loop import stratified_budget;"
            "print([stratified_budget([0.5,0.3,0.2], 7, s) for s in range(200)])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str([stratified_budget([0.5, 0.3, 0.2], 7, s) for s in range(200)])


def test_bad_budget_sampling_is_rejected():
    with pytest.raises(ConfigError, match="curriculum.0.budget_sampling.*random, stratified"):
        load_config(None, ["curriculum.0.budget_sampling=sorted"])
