"""The paper's ablations in miniature, on the demo's parent and task (docs/results.md, "Ablations").

    python benchmarks/ablations.py --demo demo_out --out ablations_out            # all arms
    python benchmarks/ablations.py --demo demo_out --out ablations_out --arms a,e  # some

It reuses what `elastic-megatron demo --out demo_out` left behind (the trained parent, its
importance scores and sorted checkpoint, the elastic run with its stage-1 checkpoint, the sliced
family and its evaluation) and trains only what an arm needs. Every trained arm uses the demo's
elastic curriculum (same stages, steps, sequence lengths and batch sizes, so the same number of
training tokens as the whole elastic run) and the same frozen teacher; only the arm's one
difference changes:

(a) the elastic family vs each smaller size made separately, (i) by prune + distill: the sorted
    parent cut to a hand-picked homogeneous architecture of the same parameter count and
    distilled on its own, and (ii) from scratch: the same architecture from random init, distilled
    from the same teacher;
(b) stage 1 only vs stage 1 + 2: the final family's architectures cut from the stage-1 checkpoint
    vs from the final one (long-problem accuracy per budget);
(c) uniform vs weighted stage-2 budget sampling: stage 2 rerun from the stage-1 checkpoint with
    uniform probabilities (the paper's claim concerns the largest model);
(d) router-chosen vs hand-picked homogeneous architecture at equal parameters: both pruned from the
    sorted parent and distilled alone with the same tokens (the homogeneous arm is (a)(i));
(e) depth ranking by iterative normalized MSE of the logits vs by cosine similarity: the parent
    with its k least important layers dropped (k = 1, 2, 3), zero-shot;
(f) routing: the demo's family (the default recipe) vs the router learning in both stages in hard
    mode and in soft mode, each deployed as the plain argmax (the behaviour before the default).

Each arm writes OUT/<arm>/...; the summary goes to OUT/ablations.json and OUT/ablations.md, and
the last line of stdout is the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elastic_megatron.config import RunConfig, load_config  # noqa: E402
from elastic_megatron.demo import evaluate_model  # noqa: E402


def say(msg: str) -> None:
    print(f"[ablations] {msg}", file=sys.stderr, flush=True)


class Demo:
    """What the demo run left in its directory."""

    def __init__(self, root: Path):
        self.root = root
        report = root / "report.json"
        if not report.exists():
            raise SystemExit(f"{report} not found: run `elastic-megatron demo --out {root}` first")
        self.report = json.loads(report.read_text())
        self.cfg = load_config(str(root / "elastic" / "config.yaml"))
        self.sorted_ckpt = self.cfg.checkpoint.load
        from elastic_megatron.elastic.importance import ImportanceScores

        self.order = ImportanceScores.load(self.cfg.elastic.importance_path).layer_order
        self.stage1_steps = self.cfg.curriculum[0].steps
        self.stage1_ckpt = root / "elastic" / "checkpoints" / f"iter_{self.stage1_steps:07d}"

    def rows(self) -> list[dict]:
        return self.report["budgets"]


def _run_cfg(cfg: RunConfig, out: Path, **changes) -> RunConfig:
    return replace(cfg, logging=replace(cfg.logging, out_dir=str(out), progress=False, wandb_mode="disabled"),
                   checkpoint=replace(cfg.checkpoint, dir="", resume=True), **changes)


def train_fixed(demo: Demo, out: Path, budget: str, spec: str, init_ckpt: str) -> str:
    """Distill one fixed subnet (a hand-picked architecture) alone with the demo's curriculum."""
    from elastic_megatron.train.elastic_loop import elastic_train

    stages = [replace(st, budget_probs=[]) for st in demo.cfg.curriculum]
    el = replace(demo.cfg.elastic, budgets=[budget], subnets=[spec])
    cfg = _run_cfg(demo.cfg, out, elastic=el, curriculum=stages,
                   distill=replace(demo.cfg.distill, teacher=demo.sorted_ckpt))
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, load=init_ckpt))
    return elastic_train(cfg, demo.order).checkpoint


def random_init_checkpoint(cfg: RunConfig, out: Path) -> str:
    """The parent architecture at its random initialisation, as a checkpoint (the from-scratch arm)."""
    from elastic_megatron.data.tokenizer import load_tokenizer
    from elastic_megatron.model.hybrid import build_model, padded_vocab_size
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed
    from elastic_megatron.train.checkpoint import save_checkpoint

    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    try:
        vocab = padded_vocab_size(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size, 1)
        model = build_model(cfg, layout, vocab, torch.float32)
        return str(save_checkpoint(out / "checkpoints", 0, model, None, {"step": 0}))
    finally:
        destroy_distributed()


def slice_eval(cfg: RunConfig, ckpt: str, named: dict, out: Path, n_short: int, n_long: int) -> dict:
    """Cut each named subnet out of `ckpt` and evaluate it: {name: {params, heldout_loss, accuracy_*}}."""
    from elastic_megatron.elastic.jobs import slice_subnets

    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, load=str(ckpt)))
    rows = slice_subnets(cfg, named, str(out))
    return {r["budget"]: {"params": r["params"], **evaluate_model(r["path"], n_short, n_long, cfg.train.seed)}
            for r in rows}


# ----------------------------------------------------------------------------- the arms

def arm_a_d(demo: Demo, out: Path, n_short: int, n_long: int, arms: str) -> dict:
    from elastic_megatron.data.tokenizer import load_tokenizer
    from elastic_megatron.elastic.subnet import Subnet, homogeneous_for_target, subnet_params
    from elastic_megatron.model.hybrid import padded_vocab_size

    m = demo.cfg.model
    vocab = padded_vocab_size(m, load_tokenizer(demo.cfg.data.tokenizer).vocab_size, 1)
    res: dict = {"a": {}, "d": {}}
    scratch_init = None
    for row in demo.rows()[1:]:  # the smaller budgets
        name, params = row["name"], row["params"]
        elastic = _keep(row)
        homo = homogeneous_for_target(m, vocab, params, tp=demo.cfg.parallel.tensor)  # valid for the run's TP
        homo_path = out / f"homogeneous_{name}.json"
        homo_path.parent.mkdir(parents=True, exist_ok=True)
        homo_path.write_text(json.dumps({"subnet": homo.to_dict()}))
        say(f"(a) budget {name}: homogeneous {subnet_params(homo, m, vocab):,} params vs router {params:,}")
        pd_ckpt = train_fixed(demo, out / f"prune_distill_{name}", name, str(homo_path), demo.sorted_ckpt)
        pd = slice_eval(demo.cfg, pd_ckpt, {name: homo}, out / f"prune_distill_{name}" / "model", n_short, n_long)[name]
        if "a" in arms:
            if scratch_init is None:
                scratch_init = random_init_checkpoint(demo.cfg, out / "scratch_init")
            sc_ckpt = train_fixed(demo, out / f"scratch_{name}", name, str(homo_path), scratch_init)
            sc = slice_eval(demo.cfg, sc_ckpt, {name: homo}, out / f"scratch_{name}" / "model", n_short, n_long)[name]
            res["a"][name] = {"elastic": elastic, "prune_distill": pd, "scratch": sc}
        if "d" in arms:
            router_sub = Subnet.from_dict(row["architecture"])
            rt_ckpt = train_fixed(demo, out / f"router_arch_{name}", name, row["path"] + "/subnet.json",
                                  demo.sorted_ckpt)
            rt = slice_eval(demo.cfg, rt_ckpt, {name: router_sub}, out / f"router_arch_{name}" / "model",
                            n_short, n_long)[name]
            res["d"][name] = {"router": {**rt, "architecture": router_sub.to_dict()},
                              "homogeneous": {**pd, "architecture": homo.to_dict()}}
    return res


def arm_b(demo: Demo, out: Path, n_short: int, n_long: int) -> dict:
    # The final family's architectures cut from the stage-1 weights: only stage 2's training differs.
    from elastic_megatron.elastic.subnet import Subnet

    fam = {r["name"]: Subnet.from_dict(r["architecture"]) for r in demo.rows()}
    s1 = slice_eval(demo.cfg, str(demo.stage1_ckpt), fam, out / "stage1_family", n_short, n_long)
    return {r["name"]: {"stage1": s1[r["name"]],
                        "stage1+2": _keep(r)}
            for r in demo.rows()}


def arm_c(demo: Demo, out: Path, n_short: int, n_long: int) -> dict:
    from elastic_megatron.elastic.jobs import family_from_checkpoint
    from elastic_megatron.train.elastic_loop import elastic_train

    run = out / "uniform_stage2"
    ckpts = run / "checkpoints"
    if not (ckpts / "latest").exists():  # start from the demo's stage-1 checkpoint (model, optimizer, router)
        ckpts.mkdir(parents=True, exist_ok=True)
        shutil.copytree(demo.stage1_ckpt, ckpts / demo.stage1_ckpt.name, dirs_exist_ok=True)
        (ckpts / "latest").write_text(demo.stage1_ckpt.name)
    stages = list(demo.cfg.curriculum)
    stages[1] = replace(stages[1], budget_probs=[])
    cfg = _run_cfg(demo.cfg, run, curriculum=stages)
    ckpt = elastic_train(cfg, demo.order).checkpoint
    uni = slice_eval(demo.cfg, ckpt, family_from_checkpoint(demo.cfg, ckpt), run / "family", n_short, n_long)
    return {r["name"]: {"weighted": _keep(r),
                        "uniform": uni[r["name"]]} for r in demo.rows()}


def arm_f(demo: Demo, out: Path, n_short: int, n_long: int) -> dict:
    """Routing: the default recipe (the demo's family) vs the router learning in both stages, hard
    or soft, each deployed as the plain argmax (elastic.deploy_tolerance=0, as before the default)."""
    from elastic_megatron.elastic.jobs import family_from_checkpoint
    from elastic_megatron.train.elastic_loop import elastic_train

    res = {r["name"]: {"default": _keep(r)} for r in demo.rows()}
    for mode in ("hard", "soft"):
        stages = [replace(st, router="learn") for st in demo.cfg.curriculum]
        el = replace(demo.cfg.elastic, mode=mode, deploy_tolerance=0.0)
        cfg = _run_cfg(demo.cfg, out / mode, elastic=el, curriculum=stages)
        ckpt = elastic_train(cfg, demo.order).checkpoint
        fam = slice_eval(cfg, ckpt, family_from_checkpoint(cfg, ckpt), out / mode / "family", n_short, n_long)
        for name, r in fam.items():
            res[name][mode] = r
    return res


def arm_e(demo: Demo, out: Path, n_short: int) -> dict:
    from elastic_megatron.elastic.jobs import importance_job
    from elastic_megatron.elastic.subnet import Subnet

    parent_cfg = load_config(str(demo.root / "importance" / "sorted" / "config.yaml"))
    cos_cfg = replace(parent_cfg, elastic=replace(parent_cfg.elastic, depth_metric="cosine", importance_path=""),
                      logging=replace(parent_cfg.logging, out_dir=str(out / "importance_cosine"), wandb_mode="disabled"),
                      checkpoint=replace(parent_cfg.checkpoint, load=str(demo.root / "parent" / "checkpoints")))
    orders = {"nmse": demo.order, "cosine": importance_job(cos_cfg)["layer_order"]}
    full = Subnet.full(parent_cfg.model)
    res: dict = {"orders": orders}
    for metric, order in orders.items():
        named = {}
        for k in (1, 2, 3):
            drop = set(order[-k:])  # the k least important layers
            named[f"drop{k}"] = replace(full, keep=tuple(i not in drop for i in range(len(full.keep))))
        evals = slice_eval(parent_cfg, demo.sorted_ckpt, named, out / f"depth_{metric}", n_short, 0)
        res[metric] = {k: {**v, "dropped": sorted(order[-int(k[-1]):])} for k, v in evals.items()}
    return res


# ----------------------------------------------------------------------------- report

KEPT = ("params", "heldout_loss", "accuracy_short", "accuracy_long", "accuracy_short_se", "accuracy_long_se",
        "n_short", "n_long")


def _keep(r: dict) -> dict:
    """What an arm reports of an evaluation row: sizes, loss, accuracies with their standard errors."""
    return {k: r[k] for k in KEPT if k in r}

def write_markdown(path: Path, res: dict) -> None:
    f = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    cols = ("params", "heldout_loss", "accuracy_short", "accuracy_long")
    head = "| params | held-out loss | accuracy short ± SE | accuracy long ± SE |"

    def cell(r, c):
        if c == "params":
            return f"{r['params']:,}"
        if c.startswith("accuracy") and f"{c}_se" in r:  # the binomial standard error beside every accuracy
            return f"{r[c]:.3f} ± {r[c + '_se']:.3f}"
        return f(r.get(c, "-"))

    def row(label, r):
        return f"| {label} | " + " | ".join(cell(r, c) for c in cols) + " |"

    lines = ["# Ablations (measured)", ""]
    if "a" in res:
        lines += ["## (a) elastic family vs prune + distill vs from scratch", "", "| budget / arm " + head,
                  "|---|---|---|---|---|"]
        for name, arms in res["a"].items():
            lines += [row(f"{name} {arm}", r) for arm, r in arms.items()]
        lines.append("")
    for key, title, arms in (("b", "(b) stage 1 only vs stage 1 + 2", ("stage1", "stage1+2")),
                             ("c", "(c) uniform vs weighted stage-2 sampling", ("uniform", "weighted")),
                             ("d", "(d) router-chosen vs hand-picked homogeneous architecture", ("router", "homogeneous")),
                             ("f", "(f) routing: the default recipe vs hard and soft routing in both stages (argmax deployed)",
                              ("default", "hard", "soft"))):
        if key in res:
            lines += [f"## {title}", "", "| budget / arm " + head, "|---|---|---|---|---|"]
            for name, r in res[key].items():
                lines += [row(f"{name} {arm}", r[arm]) for arm in arms]
            lines.append("")
    if "e" in res:
        lines += ["## (e) depth ranking: normalized MSE vs cosine (k least important layers dropped, zero-shot)", "",
                  f"Layer order, most important first: nmse {res['e']['orders']['nmse']}, "
                  f"cosine {res['e']['orders']['cosine']}.", "",
                  "| layers dropped | metric | dropped | params | held-out loss | accuracy short ± SE |", "|---|---|---|---|---|---|"]
        for k in ("drop1", "drop2", "drop3"):
            for metric in ("nmse", "cosine"):
                r = res["e"][metric][k]
                lines.append(f"| {k[-1]} | {metric} | {r['dropped']} | {r['params']:,} | {r['heldout_loss']:.3f} | "
                             f"{cell(r, 'accuracy_short')} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="demo_out", help="the demo's output directory")
    ap.add_argument("--out", default="ablations_out")
    ap.add_argument("--arms", default="a,b,c,d,e,f", help="comma-separated subset of a,b,c,d,e,f")
    ap.add_argument("--n-short", type=int, default=256, help="short held-out problems per evaluation")
    ap.add_argument("--n-long", type=int, default=64, help="long held-out problems per evaluation")
    args = ap.parse_args(argv)
    arms = set(args.arms.split(","))
    demo, out = Demo(Path(args.demo)), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    t0 = time.time()
    if arms & {"a", "d"}:
        say("(a)/(d): separately distilled sizes")
        res.update({k: v for k, v in arm_a_d(demo, out / "a_d", args.n_short, args.n_long, "".join(arms)).items()
                    if k in arms})
    if "b" in arms:
        say("(b): stage-1 family")
        res["b"] = arm_b(demo, out / "b", args.n_short, args.n_long)
    if "c" in arms:
        say("(c): stage 2 with uniform budget sampling")
        res["c"] = arm_c(demo, out / "c", args.n_short, args.n_long)
    if "f" in arms:
        say("(f): routing modes")
        res["f"] = arm_f(demo, out / "f", args.n_short, args.n_long)
    if "e" in arms:
        say("(e): depth ranking metrics")
        res["e"] = arm_e(demo, out / "e", args.n_short)
    res["wall_s"] = round(time.time() - t0, 1)
    (out / "ablations.json").write_text(json.dumps(res, indent=1))
    write_markdown(out / "ablations.md", res)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
