"""benchmarks/seeds.py's summary: mean / spread per budget and the issue-23 checks, on made-up reports."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def _seeds():
    spec = importlib.util.spec_from_file_location("seeds", REPO / "benchmarks" / "seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(full: float, small: float, parent: float) -> dict:
    rows = [{"name": n, "accuracy_short": a, "accuracy_long": 0.1, "params": 1, "heldout_loss": 0.3}
            for n, a in (("1.0", full), ("0.75", (full + small) / 2), ("0.5", small))]
    return {"budgets": rows, "parent_before_elastic": {"accuracy_short": parent, "accuracy_long": 0.1}, "total_s": 1}


def test_summary_means_spreads_and_checks():
    s = _seeds().summarize({"a": _report(0.40, 0.36, 0.41), "b": _report(0.42, 0.38, 0.41)})
    assert abs(s["budgets"]["0.5"]["short"]["mean"] - 0.37) < 1e-12
    assert s["budgets"]["0.5"]["short"]["min"] == 0.36 and s["budgets"]["0.5"]["short"]["max"] == 0.38
    assert s["checks"] == {"every_small_ge_0.85_full": True, "small_mean_ge_0.30": True,
                           "full_within_0.03_of_parent": True}
    # one seed's coin flip (0.15 against 0.40 full) fails the per-seed check and the mean
    bad = _seeds().summarize({"a": _report(0.40, 0.15, 0.41), "b": _report(0.42, 0.38, 0.41)})
    assert not bad["checks"]["every_small_ge_0.85_full"] and not bad["checks"]["small_mean_ge_0.30"]


def test_paired_ratio_and_difference_with_bootstrap_intervals():
    """--eval-short's paired comparison: the point values are the accuracies' ratio / difference, the
    90 % interval holds them, a ratio near 0.6 is resolved below the 0.85 bar, and a full model
    that only flips 10 % of its parent's outcomes at random is not resolved from it."""
    import random

    rng = random.Random(0)
    n = 400
    parent = [int(rng.random() < 0.5) for _ in range(n)]
    full = [p if rng.random() < 0.9 else 1 - p for p in parent]
    small = [f if rng.random() < 0.6 else 0 for f in full]  # loses ~40 % of the full model's wins
    ev = {"parent": {"accuracy_short": sum(parent) / n, "outcomes_short": parent},
          "1.0": {"accuracy_short": sum(full) / n, "outcomes_short": full},
          "0.5": {"accuracy_short": sum(small) / n, "outcomes_short": small}}
    r = _seeds().paired({"a": ev})["a"]
    assert r["n"] == n
    assert abs(r["small_over_full"] - sum(small) / sum(full)) < 1e-3
    lo, hi = r["small_over_full_90"]
    assert lo <= r["small_over_full"] <= hi and hi < 0.8  # ~0.6: clearly under the 0.85 bar
    lo, hi = r["full_minus_parent_90"]
    assert lo <= r["full_minus_parent"] <= hi and lo < 0 < hi
