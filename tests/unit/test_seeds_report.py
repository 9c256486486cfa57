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
