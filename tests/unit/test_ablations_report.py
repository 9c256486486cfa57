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
    rankings = ("nmse/4", "cosine/32", "truth/single-layer loss")
    res = {"a": {"0.5": {"elastic": ab._keep(ev)}},
           "e": {"orders": {m: [0, 1] for m in rankings}, "single_layer_loss": [0.5, 0.25],
                 **{m: {f"drop{k}": {**ab._keep(ev), "dropped": [k]} for k in (1, 2, 3)} for m in rankings}}}
    ab.write_markdown(tmp_path / "a.md", res)
    text = (tmp_path / "a.md").read_text()
    assert "| 0.5 elastic | 1,000 | 0.300 | 0.250 ± 0.027 | 0.000 ± 0.000 |" in text
    assert text.count("0.250 ± 0.027") == 10  # arm a, and each of the 9 depth rows
    assert "| 3 | cosine/32 | [3] | 1,000 | 0.300 | 0.250 ± 0.027 |" in text
    assert "0: 0.500, 1: 0.250" in text  # the single-layer ground truth


def test_share_of_family_is_the_budgets_sampled_steps():
    from elastic_megatron.config import load_config

    ab = _ablations()
    cfg = load_config(None, ['elastic.budgets=["1.0","0.75","0.5"]', "curriculum.0.steps=120", "curriculum.1.steps=40"])
    assert ab.share_of_family(cfg, "0.75") == [40, 12]  # 120 / 3 uniform; 40 x 0.3
    assert ab.share_of_family(cfg, "0.5") == [40, 8]  # 40 x 0.2
