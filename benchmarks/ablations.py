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
    distilled on its own with the family's tokens (equal tokens per model), (iii) the same with only
    this size's share of the family's tokens (each stage's steps x the size's sampling probability:
    equal TOTAL tokens), and (ii) from scratch: the same architecture from random init, distilled
    from the same teacher;
(b) stage 1 only vs stage 1 + 2: the final family's architectures cut from the stage-1 checkpoint
    vs from the final one (long-problem accuracy per budget);
(c) uniform vs weighted stage-2 budget sampling: stage 2 rerun from the stage-1 checkpoint with
    uniform probabilities (the paper's claim concerns the largest model);
(d) router-chosen vs hand-picked homogeneous architecture at equal parameters: both pruned from the
    sorted parent and distilled alone with the same tokens (the homogeneous arm is (a)(i));
(e) depth ranking by iterative normalized MSE of the logits vs by cosine similarity vs by the same
    iterative removal scored with KL(full || removed), each with the demo's 4 and with 32
    calibration batches, and the single-layer ground truth (held-out loss with one layer dropped):
    the parent with its k least important layers dropped (k = 1, 2, 3), zero-shot;
(f) routing: the demo's family (the default recipe) vs the router learning in both stages in hard
    mode and in soft mode, each deployed as the plain argmax (the behaviour before the default).

(m) the peer from the real library: nvidia-modelopt's Minitron pruning (`mcore_minitron`) to the
    same homogeneous widths as (a), distilled as (a)(iii) (equal total tokens), and its importance
    ranking against ours per axis (Spearman); benchmarks/modelopt_arm.py in its own process, with
    modelopt 0.46.0 installed in a private directory (--modelopt-site; not a package dependency).

`--seed S` reruns every trained arm, and the demo's elastic run itself, with training seed S (the
held-out problems stay the demo's): the second seed for differences within two standard errors.
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

    def __init__(self, root: Path, seed: int | None = None):
        self.root = root
        report = root / "report.json"
        if not report.exists():
            raise SystemExit(f"{report} not found: run `elastic-megatron demo --out {root}` first")
        self.report = json.loads(report.read_text())
        self.cfg = load_config(str(root / "elastic" / "config.yaml"))
        self.eval_seed = self.cfg.train.seed  # the held-out problems stay the demo's whatever the training seed
        if seed is not None:  # another training seed: data order, budget draws and router noise change
            self.cfg = replace(self.cfg, train=replace(self.cfg.train, seed=seed))
        self.sorted_ckpt = self.cfg.checkpoint.load
        from elastic_megatron.elastic.importance import ImportanceScores

        self.order = ImportanceScores.load(self.cfg.elastic.importance_path).layer_order
        self.stage1_steps = self.cfg.curriculum[0].steps
        self.stage1_ckpt = root / "elastic" / "checkpoints" / f"iter_{self.stage1_steps:07d}"

    def rows(self) -> list[dict]:
        return self.report["budgets"]

    def retrain_family(self, out: Path, n_short: int, n_long: int) -> None:
        """The demo's elastic run again under this training seed (same parent, sorting and
        curriculum); its family replaces the demo's rows and its stage-1 checkpoint the demo's."""
        from elastic_megatron.demo import _slice_family
        from elastic_megatron.train.elastic_loop import elastic_train

        cfg = _run_cfg(self.cfg, out)
        result = elastic_train(cfg, self.order)
        rows = _slice_family(cfg, result, out / "models")
        for row in rows:
            row.update(evaluate_model(row["path"], n_short, n_long, self.eval_seed))
        self.report = {**self.report, "budgets": rows}
        self.stage1_ckpt = out / "checkpoints" / f"iter_{self.stage1_steps:07d}"


def _run_cfg(cfg: RunConfig, out: Path, **changes) -> RunConfig:
    return replace(cfg, logging=replace(cfg.logging, out_dir=str(out), progress=False, wandb_mode="disabled"),
                   checkpoint=replace(cfg.checkpoint, dir="", resume=True), **changes)


def share_of_family(cfg: RunConfig, budget: str) -> list[int]:
    """Per curriculum stage, the steps the family spent on `budget`: the stage's steps x the
    budget's sampling probability there (stage 1 uniform: 1/3; stage 2: 0.3 for 0.75, 0.2 for
    0.5). A model trained alone for those steps sees the family's tokens for that size."""
    from elastic_megatron.train.elastic_loop import stage_probs

    b = list(cfg.elastic.budgets).index(budget)
    return [max(1, round(st.steps * stage_probs(st, len(cfg.elastic.budgets))[b])) for st in cfg.curriculum]


def train_fixed(demo: Demo, out: Path, budget: str, spec: str, init_ckpt: str, steps: list[int] | None = None) -> str:
    """Distill one fixed subnet (a hand-picked architecture) alone with the demo's curriculum
    (`steps`: per-stage step counts in place of the curriculum's)."""
    from elastic_megatron.train.elastic_loop import elastic_train

    stages = [replace(st, budget_probs=[]) for st in demo.cfg.curriculum]
    if steps is not None:
        stages = [replace(st, steps=n) for st, n in zip(stages, steps)]
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


def slice_eval(cfg: RunConfig, ckpt: str, named: dict, out: Path, n_short: int, n_long: int, seed: int) -> dict:
    """Cut each named subnet out of `ckpt` and evaluate it on the held-out problems of `seed` (the
    demo's, whatever the training seed): {name: {params, heldout_loss, accuracy_*}}."""
    from elastic_megatron.elastic.jobs import slice_subnets

    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, load=str(ckpt)))
    rows = slice_subnets(cfg, named, str(out))
    return {r["budget"]: {"params": r["params"], **evaluate_model(r["path"], n_short, n_long, seed)}
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
        pd = slice_eval(demo.cfg, pd_ckpt, {name: homo}, out / f"prune_distill_{name}" / "model", n_short, n_long, demo.eval_seed)[name]
        if "a" in arms:  # (iii) equal TOTAL tokens: the separate model gets only this size's share of the family's
            share = share_of_family(demo.cfg, name)
            say(f"(a) budget {name}: prune + distill with the family's share of tokens, stage steps {share}")
            sh_ckpt = train_fixed(demo, out / f"prune_distill_share_{name}", name, str(homo_path), demo.sorted_ckpt, share)
            sh = slice_eval(demo.cfg, sh_ckpt, {name: homo}, out / f"prune_distill_share_{name}" / "model",
                            n_short, n_long, demo.eval_seed)[name]
            if scratch_init is None:
                scratch_init = random_init_checkpoint(demo.cfg, out / "scratch_init")
            sc_ckpt = train_fixed(demo, out / f"scratch_{name}", name, str(homo_path), scratch_init)
            sc = slice_eval(demo.cfg, sc_ckpt, {name: homo}, out / f"scratch_{name}" / "model", n_short, n_long, demo.eval_seed)[name]
            res["a"][name] = {"elastic": elastic, "prune_distill": pd, "prune_distill_share": {**sh, "stage_steps": share},
                              "scratch": sc}
        if "d" in arms:
            router_sub = Subnet.from_dict(row["architecture"])
            rt_ckpt = train_fixed(demo, out / f"router_arch_{name}", name, row["path"] + "/subnet.json",
                                  demo.sorted_ckpt)
            rt = slice_eval(demo.cfg, rt_ckpt, {name: router_sub}, out / f"router_arch_{name}" / "model",
                            n_short, n_long, demo.eval_seed)[name]
            res["d"][name] = {"router": {**rt, "architecture": router_sub.to_dict()},
                              "homogeneous": {**pd, "architecture": homo.to_dict()}}
    return res


def arm_b(demo: Demo, out: Path, n_short: int, n_long: int) -> dict:
    # The final family's architectures cut from the stage-1 weights: only stage 2's training differs.
    from elastic_megatron.elastic.subnet import Subnet

    fam = {r["name"]: Subnet.from_dict(r["architecture"]) for r in demo.rows()}
    s1 = slice_eval(demo.cfg, str(demo.stage1_ckpt), fam, out / "stage1_family", n_short, n_long, demo.eval_seed)
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
    uni = slice_eval(demo.cfg, ckpt, family_from_checkpoint(demo.cfg, ckpt), run / "family", n_short, n_long, demo.eval_seed)
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
        fam = slice_eval(cfg, ckpt, family_from_checkpoint(cfg, ckpt), out / mode / "family", n_short, n_long, demo.eval_seed)
        for name, r in fam.items():
            res[name][mode] = r
    return res


CALIBRATION = (4, 32)  # calibration micro-batches (8 x 128 tokens each): the demo's, and 8x more


@torch.no_grad()
def kl_order(cfg: RunConfig) -> list[int]:
    """Layer order (most important first) by the nmse metric's iterative greedy removal with the
    score swapped for KL(full || removed) of the next-token distributions on the calibration
    batches' real tokens: what distillation optimizes, where nmse weighs every logit alike."""
    import torch.nn.functional as F

    from elastic_megatron.data.build import build_datasets
    from elastic_megatron.elastic.importance import calibration_batches, removed_layers, run_forward
    from elastic_megatron.elastic.jobs import _parent
    from elastic_megatron.parallel import destroy_distributed

    layout, tok, _, model, _ = _parent(cfg, 1)
    try:
        ds, _ = build_datasets(cfg, tok, num_train=cfg.elastic.importance_batches * cfg.train.micro_batch_size)
        model.eval()
        batches = calibration_batches(ds, cfg, layout)
        full: dict = {}
        run_forward(model, batches, lambda i, lg: full.__setitem__(i, F.log_softmax(lg.float(), -1)))  # [b, s, V]
        L, removed = cfg.model.num_layers, []
        while len(removed) < L - 1:
            candidates = [j for j in range(L) if j not in removed]
            kl = torch.zeros(len(candidates), dtype=torch.float64)
            for c, j in enumerate(candidates):
                def add(i, lg, c=c):
                    p = full[i]
                    per_tok = (p.exp() * (p - F.log_softmax(lg.float(), -1))).sum(-1)  # [b, s]
                    kl[c] += (per_tok * batches[i]["loss_mask"]).double().sum()
                with removed_layers(model, [*removed, j], 0):
                    run_forward(model, batches, add)
            removed.append(candidates[int(kl.argmin())])
        return [next(j for j in range(L) if j not in removed), *reversed(removed)]
    finally:
        destroy_distributed()


def arm_e(demo: Demo, out: Path, n_short: int, sizes=CALIBRATION) -> dict:
    """Depth rankings by metric (nmse, cosine, KL) and calibration size, each judged by the parent
    with its k least important layers dropped, zero-shot; beside them the ground truth of one layer
    at a time: the held-out loss with that layer dropped."""
    from elastic_megatron.elastic.jobs import importance_job
    from elastic_megatron.elastic.subnet import Subnet

    parent_cfg = load_config(str(demo.root / "importance" / "sorted" / "config.yaml"))
    parent_ckpt = str(demo.root / "parent" / "checkpoints")
    full = Subnet.full(parent_cfg.model)
    L = len(full.keep)

    def without(drop) -> Subnet:
        return replace(full, keep=tuple(i not in set(drop) for i in range(L)))

    orders: dict[str, list[int]] = {}
    for n in sizes:
        for metric in ("nmse", "cosine"):
            if metric == demo.cfg.elastic.depth_metric and n == demo.cfg.elastic.importance_batches:
                orders[f"{metric}/{n}"] = demo.order  # the demo's own ranking
                continue
            cfg = replace(parent_cfg, elastic=replace(parent_cfg.elastic, depth_metric=metric, importance_path="",
                                                      importance_batches=n),
                          logging=replace(parent_cfg.logging, out_dir=str(out / f"importance_{metric}_{n}"),
                                          wandb_mode="disabled"),
                          checkpoint=replace(parent_cfg.checkpoint, load=parent_ckpt))
            orders[f"{metric}/{n}"] = importance_job(cfg)["layer_order"]
        kl_cfg = replace(parent_cfg, elastic=replace(parent_cfg.elastic, importance_batches=n),
                         checkpoint=replace(parent_cfg.checkpoint, load=parent_ckpt))
        orders[f"kl/{n}"] = kl_order(kl_cfg)
        say(f"(e) {n} calibration batches: " + ", ".join(f"{k} {v}" for k, v in orders.items() if k.endswith(f"/{n}")))
    # ground truth, one layer at a time (held-out loss only: no generation)
    single = slice_eval(parent_cfg, demo.sorted_ckpt, {f"layer{j}": without([j]) for j in range(L)},
                        out / "single_layer", 0, 0, demo.eval_seed)
    single_loss = [single[f"layer{j}"]["heldout_loss"] for j in range(L)]
    orders["truth/single-layer loss"] = sorted(range(L), key=lambda j: -single_loss[j])
    # drop the k least important layers of every ranking; equal dropped sets are evaluated once
    sets = {tuple(sorted(o[-k:])) for o in orders.values() for k in (1, 2, 3)}
    named = {"drop_" + "_".join(map(str, d)): without(d) for d in sorted(sets)}
    evals = slice_eval(parent_cfg, demo.sorted_ckpt, named, out / "dropped", n_short, 0, demo.eval_seed)
    res: dict = {"orders": orders, "single_layer_loss": single_loss, "calibration_batches": list(sizes)}
    for name, order in orders.items():
        res[name] = {f"drop{k}": {**_keep(evals["drop_" + "_".join(map(str, sorted(order[-k:])))]),
                                  "dropped": sorted(order[-k:])} for k in (1, 2, 3)}
    return res


# ----------------------------------------------------------------------------- report

KEPT = ("params", "heldout_loss", "accuracy_short", "accuracy_long", "accuracy_short_se", "accuracy_long_se",
        "n_short", "n_long")


def arm_m(demo: Demo, out: Path, n_short: int, n_long: int, site: str) -> dict:
    """benchmarks/modelopt_arm.py on the demo dir, in its own process (it patches modelopt's internals
    for a CPU without Transformer Engine): per budget its prune + distill model beside the family's,
    and the per-axis Spearman of modelopt's ranking against ours."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).with_name("modelopt_arm.py")), "--demo", str(demo.root),
           "--out", str(out), "--site", site, "--n-short", str(n_short), "--n-long", str(n_long)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"failed": (p.stdout + p.stderr).strip().splitlines()[-1:]}
    got = json.loads(p.stdout.strip().splitlines()[-1])
    fam = {r["name"]: _keep(r) for r in demo.rows()}
    return {"budgets": {n: {"elastic": fam[n], "modelopt_prune_distill_share": {k: r[k] for k in (
        "params", "heldout_loss", "accuracy_short", "accuracy_short_se", "accuracy_long", "accuracy_long_se",
        "stage_steps")}} for n, r in got["budgets"].items()},
        "spearman": got["spearman"], "modelopt_version": got["modelopt_version"]}


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
        lines += ["## (a) elastic family vs prune + distill (equal tokens per model; `_share`: equal total tokens) "
                  "vs from scratch", "", "| budget / arm " + head,
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
    if "m" in res and "budgets" in res["m"]:
        lines += ["## (m) modelopt " + res["m"]["modelopt_version"] + " Minitron prune + distill (equal total tokens)",
                  "", "| budget / arm " + head, "|---|---|---|---|---|"]
        for name, arms_ in res["m"]["budgets"].items():
            lines += [row(f"{name} {arm}", r) for arm, r in arms_.items()]
        lines += ["", "Spearman, modelopt's ranking vs ours: " +
                  ", ".join(f"{k} {v['mean']:.3f}" for k, v in res["m"]["spearman"].items()), ""]
    elif "m" in res:
        lines += ["## (m) modelopt: did not run", "", f"`{res['m']['failed']}`", ""]
    if "e" in res:
        e = res["e"]
        rankings = [k for k in e["orders"]]
        lines += ["## (e) depth ranking by metric and calibration size (k least important layers dropped, zero-shot)",
                  "", "Layer order, most important first:", ""]
        lines += [f"- {k}: {e['orders'][k]}" for k in rankings]
        if "single_layer_loss" in e:
            lines += ["", "Held-out loss with one layer dropped (layer: loss): " +
                      ", ".join(f"{j}: {v:.3f}" for j, v in enumerate(e["single_layer_loss"]))]
        lines += ["", "| layers dropped | ranking | dropped | params | held-out loss | accuracy short ± SE |",
                  "|---|---|---|---|---|---|"]
        for k in ("drop1", "drop2", "drop3"):
            for name in rankings:
                r = e[name][k]
                lines.append(f"| {k[-1]} | {name} | {r['dropped']} | {r['params']:,} | {r['heldout_loss']:.3f} | "
                             f"{cell(r, 'accuracy_short')} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="demo_out", help="the demo's output directory")
    ap.add_argument("--out", default="ablations_out")
    ap.add_argument("--arms", default="a,b,c,d,e,f", help="comma-separated subset of a,b,c,d,e,f,m")
    ap.add_argument("--modelopt-site", default="/tmp/mo_site",
                    help="arm (m): where `pip install --no-deps --target DIR nvidia-modelopt==0.46.0 pulp==3.3.2` put it")
    ap.add_argument("--n-short", type=int, default=256, help="short held-out problems per evaluation")
    ap.add_argument("--n-long", type=int, default=64, help="long held-out problems per evaluation")
    ap.add_argument("--seed", type=int, default=None,
                    help="another training seed for every trained arm, the demo's family retrained with it "
                         "(evaluation problems stay the demo's)")
    args = ap.parse_args(argv)
    arms = set(args.arms.split(","))
    demo, out = Demo(Path(args.demo), args.seed), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"seed": demo.cfg.train.seed}
    t0 = time.time()
    if args.seed is not None and arms - {"e"}:
        say(f"the demo's family retrained with seed {args.seed}")
        demo.retrain_family(out / "family", args.n_short, args.n_long)
        res["family"] = {r["name"]: _keep(r) for r in demo.rows()}
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
    if "m" in arms:
        say("(m): modelopt's Minitron prune + our distillation at equal total tokens")
        res["m"] = arm_m(demo, out / "m", args.n_short, args.n_long, args.modelopt_site)
    res["wall_s"] = round(time.time() - t0, 1)
    (out / "ablations.json").write_text(json.dumps(res, indent=1))
    write_markdown(out / "ablations.md", res)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
