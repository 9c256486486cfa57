"""benchmarks/ablations.py's report: every accuracy with its binomial standard error."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def _ablations():
    spec = importlib.util.spec_from_file_location("ablations", REPO / "benchmarks" / "ablations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_prints_standard_errors(tmp_path):
    ab = _ablations()
    ev = {"params": 1_000, "heldout_loss": 0.3, "accuracy_short": 0.25, "accuracy_short_se": 0.027,
          "accuracy_long": 0.0, "accuracy_long_se": 0.0, "n_short": 256, "n_long": 64, "path": "x"}
    assert ab._keep(ev) == {k: v for k, v in ev.items() if k != "path"}
    res = {"a": {"0.5": {"elastic": ab._keep(ev)}},
           "e": {"orders": {"nmse": [0, 1], "cosine": [1, 0]},
                 **{m: {f"drop{k}": {**ab._keep(ev), "dropped": [k]} for k in (1, 2, 3)} for m in ("nmse", "cosine")}}}
    ab.write_markdown(tmp_path / "a.md", res)
    text = (tmp_path / "a.md").read_text()
    assert "| 0.5 elastic | 1,000 | 0.300 | 0.250 ± 0.027 | 0.000 ± 0.000 |" in text
    assert text.count("0.250 ± 0.027") == 7  # arm a, and each of the 6 depth rows
