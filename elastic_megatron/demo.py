"""The main job: one tiny hybrid parent -> a nested family of three models, on a laptop CPU.

    elastic-megatron demo --out demo_out

1. the parent, trained on the synthetic reasoning corpus: short problems (DIR/parent_short), then a
   length curriculum on a 2-6-step mix at 256 tokens (DIR/parent); each reused if already trained.
   For the demo's own recipe the package ships those weights (demo_parent.py) and the demo starts
   from them, as users start from a released parent; --train-parent trains it here
2. importance estimation and sorting (every budget becomes a prefix)
3. elastic training: router + frozen-teacher KD, stage 0 (short, uniform budgets, the router
   learns), stage 1 (short, the deployed family weighted to the smallest, router frozen), stage 2
   (the 2-6-step mix at 256 tokens, weighted to the largest model, router frozen)
4. the router picks a subnet for 100% / ~75% / ~50% of the parameters; the family is nested
5. each subnet is sliced into a standalone checkpoint and evaluated: held-out loss and greedy
   exact-match accuracy on short (2-3 steps) and long (4-6 steps) problems, beside each smaller
   budget pruned to a homogeneous architecture without training
6. the family is exported to Hugging Face (DIR/hf/budget_*), and the smallest exported model
   answers a held-out problem through transformers
7. DIR/report.md, DIR/report.json and DIR/quality_vs_params.png
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import demo_parent
from .compat import native
from .config import RunConfig, load_config

BUDGETS = ["1.0", "0.75", "0.5"]
# Problem lengths, as written-out steps. Short problems take 35-96 tokens; the demo's long ones
# (4-6 steps, 73-198 tokens, mean 132 against 63) need twice the tokens and a 256-token context:
# long enough that the context matters, short enough that a 2.4M-parameter model learns them in
# the demo's time. (The library's STEP_RANGES["long"], 8-12 steps, is the paper-scale default
# for stage 2; the demo's parent scored 0/64 on those and on 4-5 steps when it saw only 2-3.)
SHORT_STEPS, LONG_STEPS = (2, 3), (4, 6)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def demo_config(out: Path, overrides: list[str]) -> RunConfig:
    # Three elastic stages, the library's two with a frozen short stage between them:
    # 0 "short": 120 steps, short problems, uniform budgets, the router learns (soft masks);
    # 1 "small": 40 steps, short problems, the deployed family trained sliced, weighted
    #   0.2 / 0.2 / 0.6 to the smallest. The 0.5 model is the one short of training; more router
    #   steps for it also moved the search's pick, and the pick moved it by up to 0.13 (variants
    #   s1long, w1small), while training after the search trains whichever subnet ships. Over three
    #   seeds: 0.5 / full 0.921, 0.966, 0.952 on 1,024 problems (was 0.891, 0.931, 0.789), but the
    #   full model's long accuracy fell 0.05-0.07 in two (issue 23, docs/results.md, session 13);
    # 2 "long": 40 steps, 256 tokens, the parent's 2-6-step mix (long problems added, short ones kept,
    #   as a long-context phase keeps short data), weighted 0.5 / 0.3 / 0.2. Measured on 256 / 64
    #   problems, one seed: 4-6 steps only gave short 0.359 / 0.332 / 0.316, long 0.125 / 0.156 /
    #   0.062; the mix 0.395 / 0.355 / 0.328, long 0.094 / 0.141 / 0.094 (docs/results.md).
    stages = [{"name": "short", "steps": 120},
              {"name": "small", "steps": 40, "budget_probs": [0.2, 0.2, 0.6], "router": "frozen"},
              {"name": "long", "steps": 40, "seq_length": 256, "global_batch_size": 16, "micro_batch_size": 8,
               "budget_probs": [0.5, 0.3, 0.2], "min_steps": SHORT_STEPS[0], "max_steps": LONG_STEPS[1],
               "router": "frozen"}]
    base = [f"logging.out_dir={out}", "logging.wandb_mode=offline", "train.steps=500", "train.eval_interval=250",
            "train.lr=3e-3", "train.warmup_steps=20", f"data.min_steps={SHORT_STEPS[0]}",
            f"data.max_steps={SHORT_STEPS[1]}", "data.seq_length=128",
            f"elastic.budgets={json.dumps(BUDGETS)}", "elastic.importance_batches=4",
            f"curriculum={json.dumps(stages)}"]
    return load_config(None, base + list(overrides))


def long_context_config(cfg: RunConfig, out: Path, load: str) -> RunConfig:
    """The parent's second phase, a length curriculum (as LLMs get long-context training after
    pre-training): from the short-trained parent, 30 % more steps (150 after 500) on a 2-6-step mix
    at 256 tokens and a third of the peak LR. Measured on 256 / 64 held-out problems: short 0.422
    -> 0.402 (within one SE), long (4-6 steps) 0.000 -> 0.109 ± 0.039."""
    t = cfg.train
    return replace(cfg, logging=replace(cfg.logging, out_dir=str(out)),
                   checkpoint=replace(cfg.checkpoint, load=load),
                   data=replace(cfg.data, seq_length=256, min_steps=SHORT_STEPS[0], max_steps=LONG_STEPS[1]),
                   train=replace(t, steps=max(1, round(0.3 * t.steps)), lr=t.lr / 3, min_lr=t.min_lr / 3,
                                 warmup_steps=min(10, t.warmup_steps), eval_interval=0))


def run_demo(out_dir: str, overrides: list[str] | None = None, n_short: int = 256, n_long: int = 64,
             train_parent: bool = False) -> dict:
    """The demo into out_dir. The parent comes from a finished parent run already in out_dir, else
    from the shipped weights when the parent recipe is theirs (demo_parent.py), else it is trained;
    `train_parent` trains it even then."""
    from .elastic.importance import ImportanceScores
    from .elastic.jobs import importance_job
    from .local_ranks import local_ranks
    from .train.elastic_loop import elastic_train

    t0, out = time.time(), Path(out_dir)
    cfg = demo_config(out, overrides or [])
    timings = {}

    # 1. parent: short problems, then a length curriculum (DIR/parent_short -> DIR/parent)
    short_cfg, long_cfg = parent_configs(cfg, out)
    threads = torch.get_num_threads()
    ranks = local_ranks(cfg, threads)  # both phases have the same batch shape
    ranks_note = f" (on {ranks} local gloo ranks, {threads // ranks} thread(s) each)" if ranks > 1 else ""
    parent_source = parent_plan(short_cfg, long_cfg, train_parent)
    if parent_source.startswith("reused"):
        _say(f"1/6 reusing the trained parent in {out / 'parent'}")
    elif parent_source == "shipped":
        _say(f"1/6 the parent: the shipped one, trained by this recipe ({demo_parent.ASSET}); "
             f"--train-parent trains it here ({cfg.train.steps} + {long_cfg.train.steps} steps)")
        demo_parent.install(long_cfg)
    else:
        if demo_parent.installed(out / "parent"):  # --train-parent over an installed shipped parent
            shutil.rmtree(out / "parent")
        train_parent_phases(short_cfg, long_cfg, ranks, threads // ranks, ranks_note)
    timings["parent_s"] = time.time() - t0
    parent_eval = evaluate_model(str(out / "parent"), n_short, n_long, cfg.train.seed)
    _say(f"  parent: held-out loss {parent_eval['heldout_loss']:.3f}, accuracy short "
         f"{_acc(parent_eval, 'short')} long {_acc(parent_eval, 'long')} (before elastic training)")
    timings["parent_eval_s"] = time.time() - t0 - sum(timings.values())

    # 2. importance + sorting
    _say("2/6 importance estimation and sorting")
    imp_cfg = replace(cfg, logging=replace(cfg.logging, out_dir=str(out / "importance"), wandb_mode="disabled"),
                      checkpoint=replace(cfg.checkpoint, load=str(out / "parent" / "checkpoints")))
    imp = importance_job(imp_cfg)
    order = ImportanceScores.load(imp["importance"]).layer_order
    timings["importance_s"] = time.time() - t0 - sum(timings.values())

    # 3. elastic training
    _say("3/6 elastic training: short (uniform budgets, the router learns), small (the deployed family, "
         "weighted to the smallest), long (2-6-step mix, weighted to the largest)")
    el_cfg = load_config(imp["config"])
    # Elastic training starts from a trained parent: a sixth of the parent's peak LR keeps the full
    # model close to what it learned while the smaller budgets adapt (measured on 256 problems, one
    # seed: /3 gave 0.348 / 0.289 / 0.277 short accuracy, /6 0.367 / 0.355 / 0.305, /12 0.352 /
    # 0.352 / 0.242; docs/results.md)
    el_cfg = replace(el_cfg, logging=replace(cfg.logging, out_dir=str(out / "elastic")),
                     checkpoint=replace(cfg.checkpoint, load=imp["sorted_checkpoint"]),
                     train=replace(el_cfg.train, lr=el_cfg.train.lr / 6, min_lr=el_cfg.train.min_lr / 6,
                                   warmup_steps=10))
    result = elastic_train(el_cfg, order)
    timings["elastic_s"] = time.time() - t0 - sum(timings.values())

    # 4 + 5. pick, slice, evaluate
    _say("4/6 router picks the family; slicing")
    rows = _slice_family(el_cfg, result, out / "models")
    _say("5/6 evaluating the sliced models")
    for row in rows:
        row.update(evaluate_model(row["path"], n_short, n_long, cfg.train.seed))
        _say(f"  {row['name']}: {row['params']:,} params, held-out loss {row['heldout_loss']:.3f}, "
             f"accuracy short {_acc(row, 'short')} long {_acc(row, 'long')}")
    # a quarter of the problems: the untrained prunes score ~0 and, never writing <eos>, decode to the
    # token limit, which made them the slowest rows of the evaluation (issue 23, docs/results.md)
    baseline = _homogeneous_baseline(el_cfg, rows, out / "baseline", -(-n_short // 4), -(-n_long // 4),
                                     cfg.train.seed)
    for row in baseline:
        _say(f"  baseline {row['name']} (homogeneous prune, no training): {row['params']:,} params, accuracy "
             f"short {_acc(row, 'short')} long {_acc(row, 'long')}")
    timings["slice_eval_s"] = time.time() - t0 - sum(timings.values())
    _say("6/6 exporting the family to Hugging Face; the smallest answers through transformers")
    hf = _export_family(el_cfg, result.checkpoint, out / "hf", cfg.train.seed)
    _say(f"  {hf['budget']} via transformers: {hf['prompt']!r} -> {hf['answer_text']!r} (expected {hf['expected']})")
    timings["export_s"] = time.time() - t0 - sum(timings.values())
    _say("serving: every budget from the one elastic checkpoint (what `elastic-megatron serve` runs)")
    serving = _serving(el_cfg, result.checkpoint, n_long, cfg.train.seed)
    for label, r in serving["schedule"]["modes"].items():
        _say(f"  {label}: long accuracy {r['accuracy_long']:.3f} ± {r['se']:.3f} in {r['wall_s']:.1f} s")
    timings["serve_s"] = time.time() - t0 - sum(timings.values())
    report = {"budgets": rows, "parent_before_elastic": parent_eval, "homogeneous_baseline": baseline,
              "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "total_s": round(time.time() - t0, 1), "parent": parent_source,
              "parent_median_step_s": _median_step(out / "parent_short"),
              "elastic_median_step_s": _median_step(out / "elastic"),
              "cpu_threads": {"threads": threads, "wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                              "parent_ranks": ranks if parent_source == "trained" else 0},
              "nested": _nested(rows), "chance_accuracy": "~0 (exact match)", "hf_export": hf, "serving": serving}
    _write_report(out, report)
    _say(f"done in {report['total_s']:.0f} s: {out / 'report.md'}")
    return report


def parent_configs(cfg: RunConfig, out: Path) -> tuple[RunConfig, RunConfig]:
    """The parent's two training phases for the demo config `cfg`: DIR/parent_short, DIR/parent
    (the second starts from the first's checkpoint, set when it runs)."""
    short_cfg = replace(cfg, logging=replace(cfg.logging, out_dir=str(out / "parent_short")))
    return short_cfg, long_context_config(cfg, out / "parent", "")


def parent_plan(short_cfg: RunConfig, long_cfg: RunConfig, train_parent: bool) -> str:
    """Where the demo's parent comes from: "reused" (a finished parent run in DIR/parent; "reused,
    shipped" if that one was the shipped parent), "shipped" (demo_parent.py: the recipe is the
    shipped weights' own and `train_parent` is off) or "trained" (here, now)."""
    shipped_here = demo_parent.installed(long_cfg.logging.out_dir)
    if phase_finished(long_cfg) and not (train_parent and shipped_here):
        return "reused, shipped" if shipped_here else "reused"
    if not train_parent and demo_parent.shipped_for(short_cfg, long_cfg):
        return "shipped"
    return "trained"


def train_parent_phases(short_cfg: RunConfig, long_cfg: RunConfig, ranks: int, threads_per_rank: int,
                        note: str = "") -> None:
    """Train (or finish) the parent's two phases; a phase already run to its end is kept."""
    from .train.checkpoint import latest_checkpoint

    out_short = Path(short_cfg.logging.out_dir)
    if phase_finished(short_cfg):
        _say(f"1/6 reusing the short-trained parent in {out_short}")
    else:
        _say(f"1/6 training the parent: {short_cfg.train.steps} steps on short problems{note}")
        _train_parent(short_cfg, ranks, threads_per_rank)
    _say(f"  then {long_cfg.train.steps} steps on a {SHORT_STEPS[0]}-{LONG_STEPS[1]}-step mix at "
         f"{long_cfg.data.seq_length} tokens (length curriculum)")
    _train_parent(replace(long_cfg, checkpoint=replace(long_cfg.checkpoint, load=str(
        latest_checkpoint(out_short / "checkpoints")))), ranks, threads_per_rank)


def _train_parent(cfg: RunConfig, ranks: int, threads_per_rank: int) -> None:
    """One phase of the parent's training, here or on `ranks` local gloo ranks: on the idle 2-core
    box 2 ranks took 0.96x (short phase) and 0.92x (long phase) the step of 2 spinning threads, with
    the same losses bit for bit (local_ranks.py). The elastic stages stay in this process: their
    sliced GEMMs accumulate gradients in another order on ranks, and the family is measured as it is."""
    from .local_ranks import run_on_local_ranks
    from .train.loop import train

    if ranks == 1:
        train(cfg)
    else:
        run_on_local_ranks("train", cfg, ranks, threads_per_rank)


def _serving(cfg: RunConfig, checkpoint: str, n_long: int, seed: int) -> dict:
    """One engine holding every budget: its memory against the parent's, decode tokens/s per budget
    against the same budget cut to its own size, and think-small / answer-full on the long problems
    beside each alone (serve/report.py; benchmarks/serve_bench.py measures the same, larger)."""
    from .serve.report import decode_speed, schedule_accuracy

    c = replace(cfg, checkpoint=replace(cfg.checkpoint, load=checkpoint))
    return {"decode": decode_speed(c, batch=8, steps=16, rounds=3), "schedule": schedule_accuracy(c, n_long, seed)}


def _median_step(run: Path) -> float:
    """Median seconds per optimizer step of a training run, from its metrics: this box's speed, the
    number to compare two demos' wall times by (the same 2-core box ran the same commit's parent
    steps at 0.45 and 0.50 s on two days, and its 50-step medians moved 0.44-0.58 s in one run)."""
    if not (run / "metrics.jsonl").exists():
        return 0.0
    times = [r["step_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "step_s" in r]
    return round(statistics.median(times), 3) if times else 0.0


def phase_finished(cfg: RunConfig) -> bool:
    """Whether the run directory of `cfg` holds this training phase run to its last step. A directory
    holding another run (any model, data, train or parallel field differs: e.g. left by an older
    demo, or by one with another seed) is an error, not something to resume from or to overwrite."""
    from .config import ConfigError
    from .train.checkpoint import latest_checkpoint, loop_state

    run = Path(cfg.logging.out_dir)
    if not (run / "config.yaml").exists():
        return False
    saved = load_config(str(run / "config.yaml"))
    if demo_parent.phase_recipe(saved) != demo_parent.phase_recipe(cfg):
        raise ConfigError(f"{run} holds another run (its model, data, train or parallel config differs from this "
                          "demo's): remove it or pick another --out")
    ckpt = latest_checkpoint(run / "checkpoints")
    return ckpt is not None and loop_state(ckpt).get("step") == cfg.train.steps


def _slice_family(cfg: RunConfig, result, models_dir: Path) -> list[dict]:
    """The router's family from the final elastic checkpoint (router state included), sliced."""
    from .elastic.jobs import slice_job

    rows = slice_job(replace(cfg, checkpoint=replace(cfg.checkpoint, load=result.checkpoint)), [], str(models_dir))
    return [{"name": r["budget"], "target": int(r["target"]), "params": r["params"], "path": r["path"],
             "architecture": {"pattern": r["pattern"], **r["subnet"]}} for r in rows]


def _homogeneous_baseline(cfg: RunConfig, rows: list[dict], out: Path, n_short: int, n_long: int,
                          seed: int) -> list[dict]:
    """What pruning alone gives: the sorted parent cut, with no further training, to the most
    balanced homogeneous architecture (one width per axis, every layer) of each smaller budget's
    parameter count. The distilled version of the same baseline is ablation (a) (docs/results.md)."""
    from .data.tokenizer import load_tokenizer
    from .elastic.jobs import slice_subnets
    from .elastic.subnet import homogeneous_for_target
    from .model.hybrid import padded_vocab_size

    vocab = padded_vocab_size(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size, 1)
    named = {r["name"]: homogeneous_for_target(cfg.model, vocab, r["params"]) for r in rows[1:]}
    out_rows = slice_subnets(cfg, named, str(out))  # cfg.checkpoint.load: the sorted parent
    return [{"name": r["budget"], "params": r["params"], "path": r["path"],
             **evaluate_model(r["path"], n_short, n_long, seed)} for r in out_rows]


def _export_family(cfg: RunConfig, checkpoint: str, hf_dir: Path, seed: int) -> dict:
    """export-hf of the elastic checkpoint's family, then one held-out short problem answered by the
    smallest exported model in stock transformers (the same answer our own decoder gives)."""
    from .data.synthetic import extract_answer, heldout_problems
    from .formats.hf_jobs import export_hf_job
    from .generate import generate_elastic, generate_hf

    el = replace(cfg, checkpoint=replace(cfg.checkpoint, load=checkpoint))
    rows = export_hf_job(el, [], str(hf_dir))
    smallest = min(rows, key=lambda r: r["params"])
    problem = heldout_problems(1, seed=seed, min_steps=SHORT_STEPS[0], max_steps=SHORT_STEPS[1])[0]
    text = generate_hf(smallest["path"], [problem.prompt], max_new=120)[0]
    ours = generate_elastic(el, smallest["budget"], [problem.prompt], max_new=120)[0]  # cut at load, our decoder
    return {"same_as_ours": text == ours, "budget": smallest["budget"], "path": smallest["path"], "format": smallest["format"],
            "exported": [{k: r[k] for k in ("budget", "params", "exported_params", "format", "path")} for r in rows],
            "prompt": problem.prompt, "answer_text": text, "answer": extract_answer(text), "expected": problem.answer,
            "correct": extract_answer(text) == problem.answer}


def _nested(rows: list[dict]) -> bool:
    from .elastic.subnet import Subnet

    subnets = [Subnet.from_dict(r["architecture"]) for r in rows]
    return all(small.is_within(large) for small, large in zip(subnets[1:], subnets[:-1]))


@torch.no_grad()
def evaluate_model(model_dir: str, n_short: int, n_long: int, seed: int, outcomes: bool = False) -> dict:
    """Held-out loss and greedy exact-match accuracy (short / long problems; n = 0 skips) of a standalone
    model. `outcomes`: also each problem's 0 / 1 (`outcomes_short` ...), for paired comparisons of
    models on the same problems (benchmarks/seeds.py)."""
    from .data.synthetic import SyntheticReasoningDataset, extract_answer, heldout_problems
    from .data.tokenizer import load_tokenizer
    from .inference import greedy_generate
    from .model.hybrid import build_model, padded_vocab_size
    from .parallel import ParallelLayout, destroy_distributed, init_distributed
    from .train.checkpoint import latest_checkpoint, load_checkpoint

    cfg = load_config(str(Path(model_dir) / "config.yaml"))
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
        model = build_model(cfg, layout, padded_vocab_size(cfg.model, tok.vocab_size, 1), torch.float32).eval()
        load_checkpoint(latest_checkpoint(Path(model_dir) / "checkpoints"), model)
        ds = SyntheticReasoningDataset(128, 32, seed=seed, split="valid", min_steps=SHORT_STEPS[0],
                                       max_steps=SHORT_STEPS[1], tokenizer=tok)
        losses = []
        for i in range(0, 32, 8):
            b = {k: torch.stack([ds[j][k] for j in range(i, i + 8)]) for k in ("tokens", "labels", "loss_mask",
                                                                                "position_ids")}
            with native():  # CPU tensors only: without the CPU device remap
                per_tok = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
            losses.append(float((per_tok * b["loss_mask"]).sum() / b["loss_mask"].sum()))
        acc = {}
        for split, n, (lo, hi), max_new in (("short", n_short, SHORT_STEPS, 120), ("long", n_long, LONG_STEPS, 200)):
            if n == 0:
                continue
            problems = heldout_problems(n, seed=seed, min_steps=lo, max_steps=hi)
            # 256 rows per batch: 2.3x faster than 64 for the 256 short problems on 2 cores, the
            # same text for every problem (each row decodes its own sequence; measured, session 11)
            texts = greedy_generate(model, tok, [p.prompt for p in problems], max_new,
                                    cfg.model.hybrid_override_pattern, cfg.model.norm_epsilon, batch=256)
            right = [int(extract_answer(t) == p.answer) for t, p in zip(texts, problems)]
            a = sum(right) / n
            if outcomes:
                acc[f"outcomes_{split}"] = right
            acc[f"accuracy_{split}"] = a
            acc[f"accuracy_{split}_se"] = standard_error(a, n)
            acc[f"n_{split}"] = n
        return {"heldout_loss": sum(losses) / len(losses), **acc}
    finally:
        destroy_distributed()


def standard_error(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n problems: sqrt(p (1 - p) / n)."""
    return (acc * (1 - acc) / n) ** 0.5 if n else 0.0


def _acc(r: dict, split: str) -> str:
    """'0.352 ± 0.030' (accuracy ± its binomial standard error)."""
    a = r.get(f"accuracy_{split}", 0.0)
    return f"{a:.3f} ± {r.get(f'accuracy_{split}_se', 0.0):.3f}"


def _write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = ["# Nemotron-Elastic demo: one parent, three nested models", "",
             "| model | params | target (off by) | held-out loss | accuracy short ± SE | accuracy long ± SE | pattern |",
             "|---|---|---|---|---|---|---|"]
    p = report["parent_before_elastic"]
    lines.append(f"| parent before elastic training | {p.get('params', report['budgets'][0]['params']):,} | | "
                 f"{p['heldout_loss']:.3f} | {_acc(p, 'short')} | {_acc(p, 'long')} | |")
    for r in report["budgets"]:
        off = f"{(r['params'] / r['target'] - 1) * 100:+.1f} %"
        lines.append(f"| budget {r['name']} | {r['params']:,} | {r['target']:,} ({off}) | {r['heldout_loss']:.3f} | "
                     f"{_acc(r, 'short')} | {_acc(r, 'long')} | `{r['architecture']['pattern']}` |")
    for r in report.get("homogeneous_baseline", []):
        lines.append(f"| baseline {r['name']}: homogeneous prune, no training ({r.get('n_short', 0)} / "
                     f"{r.get('n_long', 0)} problems) | {r['params']:,} | | "
                     f"{r['heldout_loss']:.3f} | {_acc(r, 'short')} | {_acc(r, 'long')} | |")
    n_s, n_l = p.get("n_short", 0), p.get("n_long", 0)
    lines += ["", f"Accuracy: greedy exact match on {n_s} short ({SHORT_STEPS[0]}-{SHORT_STEPS[1]} steps) and "
              f"{n_l} long ({LONG_STEPS[0]}-{LONG_STEPS[1]} steps, twice the tokens) held-out problems, ± the "
              "binomial standard error sqrt(p(1-p)/n); exact match by chance is ~0. The parent saw short "
              "problems, then a 2-6-step mix at 256 tokens (length curriculum); elastic training is short "
              "problems with uniform budgets (the router learns), short problems with the deployed family "
              "weighted to the smallest, then the 2-6-step mix. The baseline rows are the sorted parent pruned to a "
              "homogeneous architecture of the same size without training (distilled: docs/results.md, ablation a).",
              "", f"Nested (checked in code): {report['nested']}.",
              f"Wall time: {report['total_s']:.0f} s ({report['timings_s']}); the parent: {report['parent']}; "
              f"median step of the parent's training {report['parent_median_step_s']:.3f} s (0 if not trained "
              f"here), of elastic training {report['elastic_median_step_s']:.3f} s (this box's speed: compare "
              "two runs' times by them), "
              f"{report['cpu_threads']['threads']} threads, OMP_WAIT_POLICY={report['cpu_threads']['wait_policy'] or 'unset'}, "
              + (f"{report['cpu_threads']['parent_ranks']} local rank(s) for the parent's training."
               if report['cpu_threads']['parent_ranks'] else "the parent not trained here."), "",
              "![quality vs parameters](quality_vs_params.png)", ""]
    hf = report.get("hf_export")
    if hf:
        load = "trust_remote_code=True" if "elastic" in hf["format"] else "stock transformers, no remote code"
        lines += ["## The family in Hugging Face format", "",
                  "| budget | params | exported params | format | directory |", "|---|---|---|---|---|"]
        lines += [f"| {r['budget']} | {r['params']:,} | {r['exported_params']:,} | {r['format']} | `{r['path']}` |"
                  for r in hf["exported"]]
        lines += ["", f"Budget {hf['budget']} answering a held-out problem through `transformers` "
                      f"(`AutoModelForCausalLM.from_pretrained`, {load}):", "", "```",
                  f"{hf['prompt']}{hf['answer_text']}", "```", "",
                  f"Answer {hf['answer']!r}, expected {hf['expected']!r}: "
                  f"{'correct' if hf['correct'] else 'wrong'}. Our own decoder on the same budget, cut from "
                  f"the elastic checkpoint at load time, gives {'the same text' if hf['same_as_ours'] else 'a different text'}.",
                  ""]
    sv = report.get("serving")
    if sv:
        mem, dec = sv["decode"]["memory"], sv["decode"]["per_budget"]
        lines += ["## One checkpoint serving every budget", "",
                  f"Memory: one engine holding all {len(dec)} budgets holds {mem['all_budgets_vs_parent']:.3f}x the "
                  f"parent's weights ({mem['parent_bytes']:,} bytes + {mem['gathered_bytes']:,} of gathered "
                  f"per-channel vectors); the budgets exported as separate models hold "
                  f"{mem['exported_separately_vs_parent']:.2f}x.", "",
                  "| budget | model id | decode tok/s, engine (views) | exported at its own size | ratio |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['model']} | {r['engine_tok_s']:.0f} | {r['exported_tok_s']:.0f} | "
                  f"{r['engine_vs_exported']:.2f} |" for name, r in dec.items()]
        lines += ["", f"Budget schedule on {sv['schedule']['n_long']} long problems (greedy, 200 new tokens at most; "
                      "the think budget writes the steps, the answer budget re-reads everything and writes the "
                      "answer line):", "", "| mode | long accuracy | wall time |", "|---|---|---|"]
        lines += [f"| {label} | {r['accuracy_long']:.3f} ± {r['se']:.3f} | {r['wall_s']:.1f} s |"
                  for label, r in sv["schedule"]["modes"].items()]
        lines.append("")
    for r in report["budgets"]:
        a = r["architecture"]
        lines.append(f"- **{r['name']}**: hidden {a['hidden']}, mamba heads {a['mamba_heads']}, head dim "
                     f"{a['mamba_head_dim']}, attention heads {a['attn_heads']}, ffn {a['ffn']}, "
                     f"layers kept {sum(a['keep'])}/{len(a['keep'])}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(out / "quality_vs_params.png", report["budgets"], report["parent_before_elastic"],
          report.get("homogeneous_baseline", []))


def _plot(path: Path, rows: list[dict], parent: dict | None = None, baseline: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [r["params"] / 1e6 for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(params, [r["heldout_loss"] for r in rows], "o-")
    ax[0].set(xlabel="parameters (M)", ylabel="held-out loss", title="loss vs size")
    for split, style in (("short", "o-"), ("long", "s--")):
        ax[1].errorbar(params, [r[f"accuracy_{split}"] for r in rows],
                       yerr=[r.get(f"accuracy_{split}_se", 0.0) for r in rows], fmt=style, capsize=3,
                       label=f"{split} problems (± SE)")
    if parent is not None:  # the parent before elastic training, for reference
        x = parent.get("params", rows[0]["params"]) / 1e6
        ax[0].plot([x], [parent["heldout_loss"]], "k*", label="parent before elastic")
        ax[1].errorbar([x], [parent["accuracy_short"]], yerr=[parent.get("accuracy_short_se", 0.0)], fmt="k*",
                       capsize=3, label="parent before elastic (short)")
        ax[0].legend()
    if baseline:  # homogeneous prune, no training
        bx = [r["params"] / 1e6 for r in baseline]
        ax[1].errorbar(bx, [r["accuracy_short"] for r in baseline], yerr=[r.get("accuracy_short_se", 0.0) for r in baseline],
                       fmt="x:", color="gray", capsize=3, label="homogeneous prune, no training (short)")
    ax[1].set(xlabel="parameters (M)", ylabel="exact-match accuracy", title="accuracy vs size", ylim=(-0.02, 1.02))
    ax[1].legend()
    for r, x in zip(rows, params):
        ax[0].annotate(r["name"], (x, r["heldout_loss"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

