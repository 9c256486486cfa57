"""The main job end to end at toy size: every stage runs and the report has what the README promises."""

from __future__ import annotations

import json

from elastic_megatron.elastic.subnet import Subnet

TOY = ["train.steps=4", "curriculum.0.steps=2", "curriculum.1.steps=2", "curriculum.1.seq_length=192",
       "curriculum.1.global_batch_size=4", "logging.progress=false", "logging.wandb_mode=disabled"]


def test_demo_writes_a_nested_evaluated_family(tmp_path, monkeypatch):
    from elastic_megatron.demo import run_demo

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    report = run_demo(str(tmp_path), TOY, n_short=4, n_long=2)
    for name in ("report.md", "report.json", "quality_vs_params.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["nested"] is True and [r["name"] for r in saved["budgets"]] == ["1.0", "0.75", "0.5"]
    subnets = [Subnet.from_dict(r["architecture"]) for r in saved["budgets"]]
    assert all(b.is_within(a) for a, b in zip(subnets, subnets[1:]))
    params = [r["params"] for r in saved["budgets"]]
    assert params[0] > params[1] >= params[2]
    for r in saved["budgets"] + [saved["parent_before_elastic"]]:
        assert r["heldout_loss"] > 0 and 0 <= r["accuracy_short"] <= 1 and 0 <= r["accuracy_long"] <= 1
    assert report["total_s"] > 0 and set(report["timings_s"]) == {"parent_s", "parent_eval_s", "importance_s",
                                                                   "elastic_s", "slice_eval_s"}
