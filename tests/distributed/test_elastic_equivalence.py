"""Elastic training on two gloo ranks (DP=2, TP=2) reproduces the single-process run.

The pipeline as the README runs it: a short parent `train`, `importance` (scores + the sorted parent
with its config), then `elastic-train` over two curriculum stages (2 + 2 steps; stage 1 has four
micro-batches per step, stage 2 two of a longer sequence) with 1 process and with 2. Compared per
step: every number the loop writes to metrics.jsonl (total loss; per budget the loss, KD, CE, router
loss, expected and chosen params; lr, grad norm), which budgets were drawn and the subnet each ran.
At the end: the router (its parameters, its Adam moments, the subnet it deploys for every budget)
and the student's weights.

What each 2-process run is compared against:
- dp2: the default elastic axes (FFN included) on the parent sorted at TP=1. The global batch's
  micro-batches are split over the DP ranks, so in one step the ranks run different budgets and
  subnets: those one process runs on the same samples.
- tp2: the same TP=1-sorted parent under TP=2 with `elastic.sort_tensor_parallel=2` (a globally sorted
  FFN is also sorted inside each of its two TP shards, so this is a valid TP=2 parent). A TP=2 FFN
  subnet keeps the first f/2 neurons of each shard while one process keeps the first f overall, and
  ElasticHybrid does not run a TP=2-sorted parent under TP=1, so both runs keep the FFN axis at full
  width (`elastic.ffn=[1.0]`), where the two agree. Hidden size, Mamba heads and head dim, attention
  heads and depth stay elastic.

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
# layout -> (overrides of both runs, overrides of the 2-process run only)
LAYOUTS = {
    "dp2": ([], ["parallel.data=2"]),
    "tp2": (["elastic.ffn=[1.0]"], ["parallel.tensor=2", "elastic.sort_tensor_parallel=2"]),
}
TOL = 1e-5
SKIP = {"time", "tokens_per_s"}  # wall clock
RMS_OF_REACH, MAX_OF_REACH = 1e-3, 5e-2  # trained weights, per tensor (see the module docstring)


@pytest.fixture(scope="module")
def sorted_parent(tmp_path_factory) -> list[str]:
    return make_sorted_parent(tmp_path_factory.mktemp("elastic_parent"), PARENT)


@pytest.fixture(scope="module")
def references(sorted_parent, tmp_path_factory) -> dict[str, Path]:
    """Both single-process runs at once (one core each), under torchrun like run_cli."""
    out = {name: tmp_path_factory.mktemp(f"elastic_single_{name}") for name in LAYOUTS}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = {}
    for name, (common, _) in LAYOUTS.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "elastic_megatron.cli", "elastic-train", *sorted_parent, *ELASTIC, *common,
               f"logging.out_dir={out[name]}"]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"single-process {name} run failed:\n{log[-6000:]}"
    return out


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


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_process_elastic_run_matches_single_process(sorted_parent, references, tmp_path, layout):
    common, extra = LAYOUTS[layout]
    run_cli(["elastic-train", *sorted_parent, *ELASTIC, *common, *extra, f"logging.out_dir={tmp_path}"], nproc=2)
    ref, got = records(references[layout]), records(tmp_path)
    # the comparison means something: steps mix budgets and several different subnets run
    assert any("," in r["budgets_seen"] for r in ref), ref
    assert len({json.dumps(r[k], sort_keys=True) for r in ref for k in r if k.endswith("/subnet")}) > 2, ref
    metrics_diff = compare_records(got, ref)

    (loop_ref, w_ref), (loop, w) = final_state(references[layout]), final_state(tmp_path)
    assert loop["step"] == loop_ref["step"] == 4 and loop["adam_step"] == loop_ref["adam_step"]
    steps, cfg_args = loop["step"], sorted_parent + common
    router_diff = weights_diff(loop["router"], loop_ref["router"], 1e-2 * steps, "router")  # router.lr 1e-2
    opt, opt_ref = loop["router_opt"]["state"], loop_ref["router_opt"]["state"]
    assert opt.keys() == opt_ref.keys()
    moments_diff = 0.0
    for i, st in opt_ref.items():
        assert float(opt[i]["step"]) == float(st["step"]) == steps
        for f in ("exp_avg", "exp_avg_sq"):  # relative to the tensor's largest entry
            moments_diff = max(moments_diff, float((opt[i][f] - st[f]).abs().max() / st[f].abs().max().clamp(min=1e-30)))
    assert moments_diff <= 100 * TOL, f"{layout}: router Adam moments differ by {moments_diff:.2e} (relative)"
    assert deployed(cfg_args, loop["router"]) == deployed(cfg_args, loop_ref["router"])

    weight_diff = weights_diff(w, w_ref, sum(r["lr"] for r in ref), "student")
    print(f"\n{layout}: logged numbers {metrics_diff:.1e}; router max {router_diff[0]:.1e} rms {router_diff[1]:.1e}, "
          f"Adam moments {moments_diff:.1e} (relative); student max {weight_diff[0]:.1e} rms {weight_diff[1]:.1e}")
