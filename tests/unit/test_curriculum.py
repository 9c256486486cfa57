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
