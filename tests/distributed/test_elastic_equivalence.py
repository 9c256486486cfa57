"""Elastic training under DP=2, TP=2, PP=2 (uneven) and TP2 x PP2 on gloo ranks reproduces
the single-process run, and a sorted parent trains and slices the same whatever TP size it was
sorted under.

The pipeline as the README runs it: a short parent `train`, `importance` (scores + the sorted parent
with its config), then `elastic-train` over two curriculum stages (2 + 2 steps; stage 1 has four
micro-batches per step, stage 2 two of a longer sequence) with 1 process and with 2. Compared per
step: every number the loop writes to metrics.jsonl (total loss; per budget the loss, KD, CE, router
loss, expected and chosen params; lr, grad norm), which budgets were drawn and the subnet each ran.
At the end: the router (its parameters, its Adam moments, the subnet it deploys for every budget)
and the student's weights.

Two recipes, each with its own single-process reference: the default (soft routing in stage 1, the
deployed family frozen and trained sliced in stage 2) for dp2, tp2, tp2_sorted_tp2, tp2pp2_sp and
tp2_sp_kd (with intermediate-layer distillation), and hard routing in both stages (the
straight-through gates) for pp2_uneven. Sliced (hard) compute
runs in every default run's stage 2. Soft mode under TP needs the router gradient of the masks a
rank uses only in part (its heads, its FFN rows) summed over TP before the router's average, and
under PP a later stage must not mask its (already masked) input again: both were wrong until this
test ran soft under TP and PP.

What each 2-process run is compared against:
- dp2: the default elastic axes (FFN included) on the parent sorted at TP=1. The global batch's
  micro-batches are split over the DP ranks, so in one step the ranks run different budgets and
  subnets: those one process runs on the same samples.
- tp2: the same TP=1-sorted parent under TP=2, every axis elastic. Loading re-lays its FFN for TP=2
  (the neurons dealt out round-robin, elastic/sorting.py), so a TP=2 FFN subnet keeps the same
  neurons as one process does.
- tp2_sorted_tp2: a parent sorted under TP=2 (`importance` on 2 ranks) from the same scores, under
  TP=2. Beyond matching one process, it must give exactly the numbers of tp2: both runs hold the
  same weights in memory.
- pp2_uneven (3 + 7 layers: PP=2 with an uneven split), tp2pp2_sp: the student and the frozen teacher pipelined together
  (each stage holds both; the p2p tensor is their activations side by side), the router's
  gradient parts summed over the stages, the per-budget metrics gathered from the last stage.
- tp2pp2_sp and tp2_sp_kd run sequence parallelism: the residual stream split along the sequence
  over the TP ranks (the p2p tensor too), gathered before and reduce-scattered after each
  projection; the soft masks', the gates' and the norms' gradients summed over the ranks' parts of
  the sequence. tp2_sp_kd adds intermediate-layer distillation (its own single-process
  reference), whose residual streams are gathered for the loss, and recomputes every layer (the
  sequence-parallel collectives run again in the backward; the numbers do not change).
Then a parent sorted under TP=2 is sliced in one process (`slice`), and every slice's forward must
equal the TP=1-loaded parent's under that subnet.

Tolerances. Logged numbers: 1e-5 (absolute below 1, relative above). Trained weights: Adam's first
step moves an entry by lr * g / (|g| + eps), steep in g where |g| ~ eps = 1e-8 (a router weight fed
by a barely used choice, a model weight few subnets touch). TP's fp32 reduction order changes such
gradients by ~1% (the gradients agree to ~3e-7 relative to their tensor's largest entry), which
moves a handful of entries by up to ~1e-5 (measured: 83 of 2.4M student weights beyond 1e-6).
Weights (student and router) are therefore bounded relative to Adam's reach, the sum of the
learning rates over the steps: every tensor's RMS difference within 0.1% of it, no entry beyond 5%
(a wrong update moves whole tensors by a sizeable part of the reach); and the router must deploy
exactly the same subnets.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, REPO, make_sorted_parent, run_cli

pytestmark = pytest.mark.distributed

PARENT = [*FAST, "data.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=4"]
ELASTIC = [*FAST, "curriculum.0.steps=2",  # stage 1: seq 32, 4 micro-batches of 1 (2 per DP rank)
           "curriculum.1.steps=2", "curriculum.1.seq_length=48", "curriculum.1.global_batch_size=4",
           "curriculum.1.micro_batch_size=2", "curriculum.1.min_steps=2", "curriculum.1.max_steps=4"]
# The recipe each layout runs: the default (soft routing in stage 1, the deployed family frozen and
# sliced in stage 2), or hard routing in both stages (the straight-through path).
# The default recipes score the router's proposals at the start of stage 2 (train/deploy_score.py:
# teacher-forced exact match, ties broken by the solution loss) on every layout, the pipeline's too.
DEPLOY = ["elastic.deploy_candidates=13", "elastic.deploy_metric=exact", "elastic.deploy_calibration_samples=8"]
RECIPES = {"default": DEPLOY, "hard": ["elastic.mode=hard", "curriculum.1.router=learn"],
           "default_kd": [*DEPLOY, "distill.intermediate_layers=[3,7]", "distill.intermediate_weight=0.5"]}
SP = "parallel.sequence_parallel=true"
# layout -> (the TP size its parent was sorted under, overrides of the parallel run, its processes, recipe)
LAYOUTS = {
    "dp2": (1, ["parallel.data=2"], 2, "default"),
    "tp2": (1, ["parallel.tensor=2"], 2, "default"),
    "tp2_sorted_tp2": (2, ["parallel.tensor=2"], 2, "default"),
    "pp2_uneven": (1, ["parallel.pipeline=2", "parallel.layers_in_first_stage=3"], 2, "hard"),
    "tp2pp2_sp": (1, ["parallel.tensor=2", "parallel.pipeline=2", SP], 4, "default"),
    "tp2_sp_kd": (1, ["parallel.tensor=2", SP, "train.recompute=full"], 2, "default_kd"),
}
TOL = 1e-5
SKIP = {"time", "step_s", "tokens_per_s"}  # wall clock
RMS_OF_REACH, MAX_OF_REACH = 1e-3, 5e-2  # trained weights, per tensor (see the module docstring)


@pytest.fixture(scope="module")
def sorted_parent(tmp_path_factory) -> list[str]:
    return make_sorted_parent(tmp_path_factory.mktemp("elastic_parent"), PARENT)


@pytest.fixture(scope="module")
def sorted_parent_tp2(sorted_parent, tmp_path_factory) -> list[str]:
    """The same parent sorted by `importance` on 2 ranks under TP=2, from the TP=1 run's scores."""
    imp1 = Path(sorted_parent[1]).parent.parent
    out = tmp_path_factory.mktemp("elastic_parent_tp2")
    run_cli(["importance", *PARENT, "parallel.tensor=2", f"elastic.importance_path={imp1 / 'importance.pt'}",
             f"checkpoint.load={imp1.parent / 'parent'}", f"logging.out_dir={out}"], nproc=2)
    return ["--config", str(out / "sorted" / "config.yaml"), f"checkpoint.load={out / 'sorted' / 'checkpoints'}"]


@pytest.fixture(scope="module")
def parents(sorted_parent, sorted_parent_tp2) -> dict[int, list[str]]:
    return {1: sorted_parent, 2: sorted_parent_tp2}


@pytest.fixture(scope="module")
def references(sorted_parent, tmp_path_factory) -> dict[str, Path]:
    """The single-process run of each recipe."""
    out = {}
    for recipe, extra in RECIPES.items():
        out[recipe] = tmp_path_factory.mktemp(f"elastic_single_{recipe}")
        run_cli(["elastic-train", *sorted_parent, *ELASTIC, *extra, f"logging.out_dir={out[recipe]}"])
    return out


_RUNS: dict[str, Path] = {}


@pytest.fixture
def two_process(parents, tmp_path_factory):
    """layout -> the output dir of its 2-process run (run once per module, on first use)."""
    def get(layout: str) -> Path:
        if layout not in _RUNS:
            sort_tp, extra, nproc, recipe = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(f"elastic_{layout}")
            run_cli(["elastic-train", *parents[sort_tp], *ELASTIC, *RECIPES[recipe], *extra, f"logging.out_dir={out}"],
                    nproc=nproc)
            _RUNS[layout] = out
        return _RUNS[layout]
    return get


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(out_dir: Path) -> tuple[dict, dict]:
    """The loop state saved with the last checkpoint (step, router, router_opt, adam_step) and the
    student's weights as full tensors under global names (TP shards joined)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = out_dir / "checkpoints" / (out_dir / "checkpoints" / "latest").read_text().strip()
    loop = torch.load(ckpt / "common.pt", weights_only=False)["loop"]
    dcp_to_torch_save(ckpt, out_dir / "full.pt")
    weights = {k: v for k, v in torch.load(out_dir / "full.pt").items()
               if torch.is_tensor(v) and not k.startswith("optimizer.")}
    return loop, weights


def compare_records(got: list[dict], ref: list[dict]) -> float:
    """Max difference (absolute below 1, relative above) over every logged number; all else equal."""
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4]
    worst = 0.0
    for g, r in zip(got, ref):
        assert set(g) == set(r), (r["step"], set(g) ^ set(r))  # the same budgets were seen
        for k in sorted(set(r) - SKIP):
            a, b = g[k], r[k]
            if isinstance(b, float):
                worst = max(worst, abs(a - b) / max(1.0, abs(b)))
                assert math.isclose(a, b, rel_tol=TOL, abs_tol=TOL), (r["step"], k, a, b)
            else:  # budgets_seen, stage, step, chosen_params, the subnet each budget ran
                assert a == b, (r["step"], k, a, b)
    return worst


def weights_diff(got: dict, ref: dict, reach: float, what: str) -> tuple[float, float]:
    """(max |diff|, largest per-tensor RMS diff), each checked against Adam's reach (sum of the lrs)."""
    assert set(got) == set(ref), set(got) ^ set(ref)
    worst_max = worst_rms = 0.0
    for k in ref:
        d = got[k].double() - ref[k].double()
        mx, rms = float(d.abs().max()), float(d.pow(2).mean().sqrt())
        assert rms <= RMS_OF_REACH * reach and mx <= MAX_OF_REACH * reach, (what, k, mx, rms, reach)
        worst_max, worst_rms = max(worst_max, mx), max(worst_rms, rms)
    return worst_max, worst_rms


def deployed(args: list[str], router_state: dict) -> list[dict]:
    """The subnet the router deploys for every budget (noise-free argmax; default layer order)."""
    from elastic_megatron.config import load_config
    from elastic_megatron.data.tokenizer import load_tokenizer
    from elastic_megatron.elastic.router import build_router

    cfg = load_config(args[1], args[2:])
    router = build_router(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size)
    router.load_state_dict(router_state)
    return [router.inference(b).to_dict() for b in range(len(router.targets))]


def router_family(args: list[str], loop: dict) -> list[dict]:
    """The family the router alone deploys (elastic.deploy_candidates=1) from a run's final router."""
    from elastic_megatron.config import load_config
    from elastic_megatron.data.tokenizer import load_tokenizer
    from elastic_megatron.elastic.deploy import deployed_family
    from elastic_megatron.elastic.router import build_router
    from elastic_megatron.model.hybrid import padded_vocab_size

    cfg = load_config(args[1], args[2:])
    vocab = padded_vocab_size(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size, 1)
    router = build_router(cfg, vocab, layer_order=loop["layer_order"], tp=1)
    router.load_state_dict(loop["router"])
    return [s.to_dict() for s in deployed_family(router, router.fixed_subnets(cfg.elastic.subnets, 1),
                                                 cfg.elastic.deploy_tolerance)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_process_elastic_run_matches_single_process(parents, references, two_process, layout):
    sort_tp, reference = LAYOUTS[layout][0], references[LAYOUTS[layout][3]]
    out = two_process(layout)
    ref, got = records(reference), records(out)
    # the comparison means something: steps mix budgets and several different subnets run, FFN cut too
    assert any("," in r["budgets_seen"] for r in ref), ref
    subnets = [r[k] for r in ref for k in r if k.endswith("/subnet")]
    assert len({json.dumps(x, sort_keys=True) for x in subnets}) > 2, ref
    assert any(f < 768 for x in subnets for f in x["ffn"]), subnets  # tiny parent: ffn_hidden_size 768
    metrics_diff = compare_records(got, ref)

    (loop_ref, w_ref), (loop, w) = final_state(reference), final_state(out)
    assert loop["step"] == loop_ref["step"] == 4 and loop["adam_step"] == loop_ref["adam_step"]
    assert loop["ffn_layout_tp"] == (2 if "parallel.tensor=2" in LAYOUTS[layout][1] else 1)
    assert loop_ref["ffn_layout_tp"] == 1
    steps, cfg_args = loop["step"], parents[sort_tp]
    router_steps = steps if LAYOUTS[layout][3] == "hard" else 2  # the default recipe freezes it after stage 1
    router_diff = weights_diff(loop["router"], loop_ref["router"], 1e-2 * router_steps, "router")  # router.lr 1e-2
    opt, opt_ref = loop["router_opt"]["state"], loop_ref["router_opt"]["state"]
    assert opt.keys() == opt_ref.keys()
    moments_diff = 0.0
    for i, st in opt_ref.items():
        assert float(opt[i]["step"]) == float(st["step"]) == router_steps
        for f in ("exp_avg", "exp_avg_sq"):  # relative to the tensor's largest entry
            moments_diff = max(moments_diff, float((opt[i][f] - st[f]).abs().max() / st[f].abs().max().clamp(min=1e-30)))
    assert moments_diff <= 100 * TOL, f"{layout}: router Adam moments differ by {moments_diff:.2e} (relative)"
    assert deployed(cfg_args, loop["router"]) == deployed(cfg_args, loop_ref["router"])
    if LAYOUTS[layout][3] != "hard":  # the deploy search chose the same family on this layout
        assert loop["family"] == loop_ref["family"]
        # ... and it chose: at least one budget is not the router's own proposal
        assert loop_ref["family"] != router_family(cfg_args, loop_ref), loop_ref["family"]

    # the student's FFN as saved is laid out for the run's TP: bring it to the TP=1 layout to compare
    weight_diff = weights_diff(relaid(w, loop["ffn_layout_tp"]), w_ref, sum(r["lr"] for r in ref), "student")
    print(f"\n{layout}: logged numbers {metrics_diff:.1e}; router max {router_diff[0]:.1e} rms {router_diff[1]:.1e}, "
          f"Adam moments {moments_diff:.1e} (relative); student max {weight_diff[0]:.1e} rms {weight_diff[1]:.1e}")


def relaid(weights: dict, from_tp: int) -> dict:
    """Full tensors saved from a TP=`from_tp` run, with the MLP neurons in the TP=1 order."""
    from elastic_megatron.elastic.sorting import ffn_relay_index

    out = {}
    for k, v in weights.items():
        dim = 0 if k.endswith("linear_fc1.weight") else 1 if k.endswith("linear_fc2.weight") else None
        out[k] = v if dim is None else v.index_select(dim, ffn_relay_index(v.shape[dim], from_tp, 1))
    return out


def test_sorted_under_tp1_or_tp2_trains_identically_under_tp2(two_process):
    """The acceptance check of TP portability: `importance` once (at TP=1) is enough for a TP=2 run."""
    a, b = records(two_process("tp2")), records(two_process("tp2_sorted_tp2"))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in SKIP} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)  # bit-identical: the same weights in memory, the same computation


def test_sorted_parents_differ_only_by_the_ffn_layout(parents, tmp_path):
    """The TP=2-sorted checkpoint is the TP=1-sorted one with each MLP's neurons dealt out to 2 shards."""
    full = {}
    for tp, args in parents.items():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        root = Path(args[2].split("=", 1)[1])
        dcp_to_torch_save(root / (root / "latest").read_text().strip(), tmp_path / f"tp{tp}.pt")
        full[tp] = {k: v for k, v in torch.load(tmp_path / f"tp{tp}.pt").items() if torch.is_tensor(v)}
    assert full[1].keys() == full[2].keys()
    assert any(not torch.equal(full[1][k], full[2][k]) for k in full[1] if "linear_fc" in k)  # a real re-lay
    got = relaid(full[2], 2)
    for k in full[1]:
        assert torch.equal(got[k], full[1][k]), k


def test_parent_sorted_under_tp2_slices_in_one_process_to_its_subnets(sorted_parent_tp2, tmp_path):
    out = tmp_path / "family"
    run_cli(["slice", *sorted_parent_tp2, "--budget", "0.75", "--budget", "0.5", "--out", str(out)])
    res = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "tests" / "distributed" / "_portability_worker.py"), str(res), sorted_parent_tp2[1],
           sorted_parent_tp2[2].split("=", 1)[1], str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    r = json.loads(res.read_text())
    assert r["checkpoint_layout_tp"] == 2  # the parent really was written under TP=2 and re-laid for TP=1
    assert [x["budget"] for x in r["results"]] == ["0.75", "0.5"] and all(x["ffn_cut"] for x in r["results"])
    for x in r["results"]:
        assert x["max_abs_diff"] <= 1e-5 * max(1.0, x["max_abs_logit"]), x  # measured 1e-6 at logits ~2
