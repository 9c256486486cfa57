"""One process through the CLI: `elastic-train` with hand-picked subnets (prune-and-distill) and the
full budget in soft mode, then `slice` of the result."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, make_sorted_parent, read_metrics, run_cli

PARENT = [*FAST, "data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4"]
ONE_STAGE = ["curriculum=[{name: short, steps: 2}]"]
SPEC = "hidden=0.5,mamba_heads=0.5,attn_heads=0.5,ffn=0.25,depth=0.8"


@pytest.fixture(scope="module")
def sorted_parent(tmp_path_factory) -> list[str]:
    return make_sorted_parent(tmp_path_factory.mktemp("elastic_run_parent"), PARENT)


def test_hand_picked_subnet_trains_and_slices_that_architecture(sorted_parent, tmp_path):
    from elastic_megatron.config import load_config
    from elastic_megatron.elastic.importance import ImportanceScores
    from elastic_megatron.elastic.subnet import subnet_from_spec, subnet_params

    run_cli(["elastic-train", *sorted_parent, *FAST, *ONE_STAGE, 'elastic.budgets=["1.0","0.5"]',
             f'elastic.subnets=["","{SPEC}"]', f"logging.out_dir={tmp_path / 'run'}"])
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    order = ImportanceScores.load(cfg.elastic.importance_path).layer_order
    want = subnet_from_spec(SPEC, cfg.model, order)
    assert sum(want.keep) == 8  # depth 0.8 of 10 layers: the two least important ones dropped
    assert [i for i, k in enumerate(want.keep) if not k] == sorted(order[-2:])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    seen = [r for r in records if "0.5/subnet" in r]
    assert seen, "the hand-picked budget was never drawn"
    for r in seen:
        assert r["0.5/subnet"] == want.to_dict()
        assert r["0.5/router_loss"] == 0.0
        assert r["0.5/chosen_params"] == r["0.5/expected_params"] == subnet_params(want, cfg.model, 64)
    run_cli(["slice", "--config", str(tmp_path / "run" / "config.yaml"),
             f"checkpoint.load={tmp_path / 'run' / 'checkpoints'}", "--out", str(tmp_path / "models")])
    rows = json.loads((tmp_path / "models" / "slices.json").read_text())
    assert [r["budget"] for r in rows] == ["1.0", "0.5"]
    assert rows[1]["subnet"] == want.to_dict()


def test_full_budget_in_soft_mode_runs_the_full_model(sorted_parent, tmp_path):
    """The student starts as the teacher: at full size (no router choice, no soft masks) KD is 0."""
    run_cli(["elastic-train", *sorted_parent, *FAST, *ONE_STAGE, "elastic.mode=soft",
             "curriculum.0.budget_probs=[1.0,0.0,0.0]", "curriculum.0.steps=1", f"logging.out_dir={tmp_path}"])
    assert read_metrics(tmp_path, "1.0/kd")[0] <= 1e-6


def test_bad_hand_picked_subnets_are_rejected(sorted_parent):
    from elastic_megatron.config import ConfigError, load_config

    for bad, words in (('elastic.subnets=["x"]', "has 1 entries"),
                       ('elastic.subnets=["","mamba_heads=0.3",""]', "multiple of groups"),
                       ('elastic.subnets=["","heads=0.5",""]', "unknown axis"),
                       ('elastic.subnets=["","missing.json",""]', "no such subnet file")):
        with pytest.raises(ConfigError, match="elastic.subnets") as e:
            load_config(sorted_parent[1], [bad])
        assert words in str(e.value)


def test_intermediate_layer_distillation(sorted_parent, tmp_path):
    """Off by default (logged 0); on, it is 0 where student == teacher (full size, first step) and
    positive for a smaller subnet, and the total loss includes it with its weight."""
    stages = "curriculum=[{name: full, steps: 1, budget_probs: [1.0, 0.0, 0.0]}, {name: mixed, steps: 2}]"
    run_cli(["elastic-train", *sorted_parent, *FAST, stages,
             "distill.intermediate_layers=[3,7]", "distill.intermediate_weight=0.5", f"logging.out_dir={tmp_path}"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["budgets_seen"] == "1.0" and records[0]["1.0/intermediate"] <= 1e-10
    small = [(r[f"{b}/intermediate"], r[f"{b}/loss"], r[f"{b}/kd"], r[f"{b}/router_loss"])
             for r in records for b in ("0.75", "0.5") if f"{b}/intermediate" in r]
    assert small and all(h > 1e-6 for h, *_ in small)
    for h, total, kd, router in small:
        assert abs(total - (kd + router + 0.5 * h)) <= 1e-5 * max(1.0, abs(total))


def test_intermediate_distillation_under_pipeline_parallelism_is_refused(sorted_parent, monkeypatch):
    """Residual streams of chosen layers live on different stages under PP: one clear line instead."""
    from elastic_megatron.config import ConfigError, load_config
    from elastic_megatron.train.elastic_loop import elastic_train

    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any process group is made
    cfg = load_config(sorted_parent[1], [sorted_parent[2], "parallel.pipeline=2", "distill.intermediate_layers=[3]"])
    with pytest.raises(ConfigError, match="distill.intermediate_layers.*parallel.pipeline=1"):
        elastic_train(cfg)


def test_bf16_elastic_run_tracks_fp32(sorted_parent, tmp_path):
    """bf16 (the GPU default) on CPU: the same budgets and subnets, per-budget CE within 1% and the
    total loss within 2% of the fp32 run over 3 steps (measured: CE 3e-4, total 0.3%). Before the
    model was cast whole to bf16 (megatron keeps A_log, D, dt_bias fp32) no bf16 checkpoint could
    be written, and the fp32 main params still held the random init after loading the parent."""
    stages = "curriculum=[{name: s, steps: 3}]"
    out = {}
    for precision in ("fp32", "bf16"):
        run_cli(["elastic-train", *sorted_parent, *FAST, stages, f"train.precision={precision}",
                 f"logging.out_dir={tmp_path / precision}"])
        out[precision] = [json.loads(x) for x in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(out["fp32"], out["bf16"], strict=True):
        assert a["budgets_seen"] == b["budgets_seen"]
        assert abs(a["loss"] - b["loss"]) <= 2e-2 * a["loss"], (a["step"], a["loss"], b["loss"])
        for k in a:
            if k.endswith("/ce"):
                assert abs(a[k] - b[k]) <= 1e-2 * a[k], (a["step"], k, a[k], b[k])
            if k.endswith("/subnet"):
                assert a[k] == b[k], (a["step"], k)
    assert (tmp_path / "bf16" / "checkpoints" / "latest").exists()


def test_sigusr1_mid_curriculum_resumes_the_same_run(sorted_parent, tmp_path):
    """Preemption of elastic training (SIGUSR1, in stage 1 of two): the checkpoint holds the step just
    finished with router, router optimizer and curriculum position; the rerun's losses, budget draws
    and subnets continue the uninterrupted run exactly."""
    import signal

    from elastic_megatron.config import load_config
    from elastic_megatron.train.checkpoint import latest_checkpoint
    from elastic_megatron.train.elastic_loop import elastic_train
    from elastic_megatron.train.preemption import Preempted
    from tests.unit.test_resume import signal_after

    stages = ["curriculum.0.steps=4", "curriculum.1.steps=2", "curriculum.1.seq_length=48",
              "curriculum.1.global_batch_size=4"]

    def cfg(out):
        return load_config(sorted_parent[1], [*sorted_parent[2:], *FAST, *stages, f"logging.out_dir={out}"])

    elastic_train(cfg(tmp_path / "straight"))
    signal_after(tmp_path / "split" / "metrics.jsonl", 2, signal.SIGUSR1)
    with pytest.raises(Preempted) as info:
        elastic_train(cfg(tmp_path / "split"))
    k = info.value.step
    assert 2 <= k < 6 and latest_checkpoint(tmp_path / "split" / "checkpoints").name == f"iter_{k:07d}"
    elastic_train(cfg(tmp_path / "split"))

    def records(run):
        return [{key: v for key, v in json.loads(line).items() if key not in ("tokens_per_s", "step_s", "time")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert records(tmp_path / "split") == records(tmp_path / "straight")

    # kill -9 (no handler runs) at a step boundary with a save every step, then the same command again
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    killed = tmp_path / "killed"
    argv = [sys.executable, "-m", "elastic_megatron.cli", "elastic-train", *sorted_parent, *FAST, *stages,
            "checkpoint.save_interval=1", f"logging.out_dir={killed}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}  # this process's
    log = open(tmp_path / "killed.log", "w")
    import torch

    # the same thread count as this process's runs: another one rounds differently
    threads = str(torch.get_num_threads())
    proc = subprocess.Popen(argv, cwd=REPO, env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads},
                            stdout=log, stderr=log)
    def logged() -> int:
        f = killed / "metrics.jsonl"
        return len(f.read_text().splitlines()) if f.exists() else 0

    while proc.poll() is None and logged() < 3:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    newest = latest_checkpoint(killed / "checkpoints")
    assert newest is not None and int(newest.name[5:]) < 6, (tmp_path / "killed.log").read_text()[-3000:]
    elastic_train(cfg(killed))  # resumes from the newest complete checkpoint
    assert records(killed) == records(tmp_path / "straight")  # steps the killed run logged but never saved: redone


def test_frozen_stage_trains_the_deployed_family(sorted_parent, tmp_path):
    """The default recipe: soft routing while the router learns, then a `router: frozen` stage that
    runs every budget's deployed subnet (on budget within elastic.deploy_tolerance), sliced, with the
    router untouched; `slice` then cuts exactly the subnets that stage trained."""
    import torch

    from elastic_megatron.config import load_config
    from elastic_megatron.elastic.jobs import choose_family

    stages = "curriculum=[{name: learn, steps: 2}, {name: fixed, steps: 2, router: frozen}]"
    out = tmp_path / "run"
    run_cli(["elastic-train", *sorted_parent, *FAST, stages, "elastic.mode=soft", "checkpoint.save_interval=0",
             "elastic.deploy_candidates=4", f"logging.out_dir={out}"])
    cfg = load_config(str(out / "config.yaml"))
    loops = {s: torch.load(out / "checkpoints" / f"iter_{s:07d}" / "common.pt", weights_only=False)["loop"]
             for s in (2, 4)}
    for k, v in loops[2]["router"].items():  # the frozen stage did not move the router (nor its Adam)
        assert torch.equal(v, loops[4]["router"][k]), k
    family = choose_family(cfg, loops[4], 64, [])
    # the frozen stage chose its family on held-out loss (deploy_candidates) and recorded it: slice
    # cuts that recorded family, not a re-derivation from the router
    assert "family" not in loops[2] and loops[4]["family"] == [family[b][0].to_dict() for b in cfg.elastic.budgets]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    frozen = [r for r in records if r["stage"] == "fixed"]
    assert frozen and all(r[f"{b}/router_loss"] == 0.0 for r in frozen for b in r["budgets_seen"].split(","))
    for r in frozen:
        for b in r["budgets_seen"].split(","):
            subnet, target = family[b]
            assert r[f"{b}/subnet"] == subnet.to_dict(), b
            assert abs(r[f"{b}/chosen_params"] / target - 1) <= cfg.elastic.deploy_tolerance, (b, r[f"{b}/chosen_params"])


def test_a_stage_recomputes_by_its_own_setting(sorted_parent, tmp_path, monkeypatch):
    """curriculum.N.recompute overrides train.recompute for that stage only (the student's layers;
    the teacher runs without autograd and keeps nothing either way)."""
    import torch

    import elastic_megatron.elastic.model as elastic_model

    seen: list[tuple[int, str]] = []
    real = elastic_model.layer_call
    step = {"n": 0}

    def spy(mode, fn, *args):
        if torch.is_grad_enabled():
            seen.append((step["n"], mode))
        return real(mode, fn, *args)

    monkeypatch.setattr(elastic_model, "layer_call", spy)
    import elastic_megatron.train.elastic_loop as loop

    real_reduce = loop._reduce_metrics

    def count_steps(*a, **k):  # called once per optimizer step, after its forward and backward
        step["n"] += 1
        return real_reduce(*a, **k)

    monkeypatch.setattr(loop, "_reduce_metrics", count_steps)
    stages = "curriculum=[{name: a, steps: 2}, {name: b, steps: 1, recompute: full}, {name: c, steps: 1, recompute: none}]"
    run_cli(["elastic-train", *sorted_parent, *FAST, stages, "train.recompute=full", f"logging.out_dir={tmp_path}"])
    modes = {}
    for n, mode in seen:
        modes.setdefault(n, set()).add(mode)
    assert modes == {0: {"full"}, 1: {"full"}, 2: {"full"}, 3: {"none"}}, modes


def test_stratified_budget_sampling_is_what_the_loop_trains(sorted_parent, tmp_path):
    """curriculum.N.budget_sampling=stratified reaches the loop: every step trains the budgets
    stratified_budget gives its micro-batches (slot = index in the stage's global batch order,
    whatever the DP split)."""
    from elastic_megatron.config import load_config
    from elastic_megatron.train.elastic_loop import stratified_budget

    # two DP ranks under torchrun (the console module): each runs one of a step's two micro-batches,
    # and the budgets are still those of the micro-batches' global slots
    run_cli(["elastic-train", *sorted_parent, *FAST, "curriculum=[{name: s, steps: 4, budget_sampling: stratified}]",
             "parallel.data=2", f"logging.out_dir={tmp_path}"], nproc=2)
    cfg = load_config(str(tmp_path / "config.yaml"))
    names = list(cfg.elastic.budgets)
    n_micro = cfg.train.global_batch_size // cfg.train.micro_batch_size  # global micro-batches per step
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "budgets_seen" in r]
    assert len(steps) == 4 and n_micro >= 2
    for s, r in enumerate(steps):
        want = {names[stratified_budget([1 / 3] * 3, cfg.train.seed, s * n_micro + m)] for m in range(n_micro)}
        assert set(r["budgets_seen"].split(",")) == want, (s, r["budgets_seen"], want)
