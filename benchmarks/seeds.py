"""Seed study (issue 23): the demo's family over training seeds, mean ± spread per budget.

    python benchmarks/seeds.py --out bench_seeds                      # all four runs (~35-40 min, 2 cores)
    python benchmarks/seeds.py --out bench_seeds --runs seed1234      # one run; the others later
    python benchmarks/seeds.py --out bench_seeds --summarize           # only read the runs already there
    python benchmarks/seeds.py --out bench_seeds --add seed1234=/tmp/demo_out   # reuse a finished demo dir
    python benchmarks/seeds.py --out bench_seeds --summarize --eval-short 1024 --deploy-search 4

The runs (each one `elastic_megatron.cli demo`, 256 short and 64 long held-out problems):

    seed1234       the default seed, OMP_NUM_THREADS=2
    seed4321       train.seed=4321
    seed777        train.seed=777
    seed1234_omp1  the default seed with OMP_NUM_THREADS=1 (a different rounding of the same run)

A run whose OUT/NAME/report.json exists is reused, never retrained, so the study can be spread over
several sessions. Reported per budget: mean, min-max spread and sample std of short / long accuracy
over the runs present, and the issue's checks: every run's 0.5 model >= 0.85 x its full budget
(short), mean 0.5 short >= 0.30, |mean full - mean parent| <= 0.03. Writes OUT/seeds.md and
OUT/seeds.json; the last line of stdout is the JSON summary.

Two measurements beside the demo's own numbers, both on the finished runs (nothing retrained):

--eval-short N   each run's family and parent again on N short problems (the run's first 256 are
                 the demo's), every problem's outcome kept, so the budgets are compared *paired*
                 on the same problems: per run the smallest / full ratio and full - parent with a
                 90 % bootstrap interval over problems. Why: at 256 problems one accuracy has a
                 standard error of ~0.03, so a ratio of two has ~0.1, as wide as the 0.85 bar's
                 distance from the paper's 0.91; the demo's numbers alone cannot say whether a run
                 misses the bar or only its sample does. Cached in RUN/eval_short_N.json.
--deploy-search K  the deploy search (elastic.deploy_candidates = K) replayed on each run's stage-1
                 checkpoint: the router's proposals per budget with their calibration losses and
                 whether the search would deploy another family than the run did (the run's
                 stage 2 trained the router's own); --deploy-metric picks the score (default auto:
                 exact match on held-out problems), --deploy-samples how many problems it scores
                 (default 0: the metric's own). Cached in RUN/deploy_search_K_METRIC[_nN].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RUNS = {"seed1234": (1234, "2"), "seed4321": (4321, "2"), "seed777": (777, "2"), "seed1234_omp1": (1234, "1")}


def run_one(out: Path, name: str, run_dir: Path | None = None, overrides: list[str] = (),
            parent_from: Path | None = None) -> None:
    """One demo run of RUNS[name] into run_dir (default OUT/NAME). `parent_from`: a finished run
    whose trained parent is copied in first, so the demo reuses it and trains only the elastic
    part (a variant of the method compared on the very same parent)."""
    seed, threads = RUNS[name]
    run_dir = run_dir or out / name
    if parent_from is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("parent_short", "parent"):
            if not (run_dir / sub).exists():
                shutil.copytree(parent_from / sub, run_dir / sub, symlinks=True)
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    # --train-parent: the study is of the whole recipe, the parent's training included (the default
    # seed's demo would otherwise start from the shipped parent, and the one-thread run would be
    # another rounding of the elastic stages only)
    cmd = [sys.executable, "-m", "elastic_megatron.cli", "demo", "--out", str(run_dir), "--train-parent",
           f"train.seed={seed}", *overrides]
    tic = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"{run_dir.name}: {time.time() - tic:.0f} s", flush=True)


def summarize(reports: dict[str, dict]) -> dict:
    """Per budget over the runs: mean / min / max / std of short and long accuracy, plus the checks."""
    budgets = [r["name"] for r in next(iter(reports.values()))["budgets"]]
    per = {}
    for b in budgets + ["parent"]:
        rows = {n: (rep["parent_before_elastic"] if b == "parent" else
                    next(r for r in rep["budgets"] if r["name"] == b)) for n, rep in reports.items()}
        per[b] = {"runs": {n: {"short": r.get("accuracy_short"), "long": r.get("accuracy_long"),
                               "params": r.get("params"), "heldout_loss": r.get("heldout_loss")}
                           for n, r in rows.items()}}
        for split in ("short", "long"):
            v = [r[split] for r in per[b]["runs"].values() if r[split] is not None]
            per[b][split] = {"mean": statistics.mean(v), "min": min(v), "max": max(v),
                             "std": statistics.stdev(v) if len(v) > 1 else 0.0}
    full, small = budgets[0], budgets[-1]
    ratios = {n: per[small]["runs"][n]["short"] / max(per[full]["runs"][n]["short"], 1e-9) for n in reports}
    checks = {"every_small_ge_0.85_full": all(r >= 0.85 for r in ratios.values()),
              "small_mean_ge_0.30": per[small]["short"]["mean"] >= 0.30,
              "full_within_0.03_of_parent": abs(per[full]["short"]["mean"] - per["parent"]["short"]["mean"]) <= 0.03}
    return {"runs": sorted(reports), "budgets": per, "small_over_full": ratios, "checks": checks,
            "total_s": {n: rep.get("total_s") for n, rep in reports.items()}}


def _bootstrap(fn, cols: list[list[int]], reps: int = 2000, seed: int = 0) -> list[float]:
    """90 % interval of fn(*columns) over problems resampled with replacement (paired: one index
    draw for every column, since all were answered on the same problems)."""
    import numpy as np

    a = np.array(cols, dtype=np.float64)  # [columns, problems]
    idx = np.random.default_rng(seed).integers(0, a.shape[1], size=(reps, a.shape[1]))
    vals = np.sort(fn(*(a[c][idx].mean(axis=1) for c in range(a.shape[0]))))
    return [round(float(vals[int(0.05 * reps)]), 4), round(float(vals[int(0.95 * reps) - 1]), 4)]


def reevaluate(d: Path, n_short: int) -> dict:
    """The run's family and parent on n_short short problems, each problem's outcome kept."""
    cache = d / f"eval_short_{n_short}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from elastic_megatron.config import load_config
    from elastic_megatron.demo import evaluate_model

    seed = load_config(str(d / "elastic" / "config.yaml")).train.seed  # the demo evaluates on its seed's problems
    rep = json.loads((d / "report.json").read_text())
    models = {"parent": str(d / "parent"), **{r["name"]: r["path"] for r in rep["budgets"]}}
    res = {}
    for name, path in models.items():
        r = evaluate_model(path, n_short, 0, seed, outcomes=True)
        res[name] = {"accuracy_short": r["accuracy_short"], "outcomes_short": r["outcomes_short"]}
    cache.write_text(json.dumps(res))
    return res


def paired(evals: dict[str, dict]) -> dict:
    """Per run: accuracies, smallest / full and full - parent with 90 % bootstrap intervals."""
    out = {}
    for n, ev in evals.items():
        names = [k for k in ev if k != "parent"]
        full, small = names[0], names[-1]
        def o(k, ev=ev):
            return ev[k]["outcomes_short"]
        out[n] = {"n": len(o(full)), "accuracy": {k: round(v["accuracy_short"], 4) for k, v in ev.items()},
                  "small_over_full": round(ev[small]["accuracy_short"] / max(ev[full]["accuracy_short"], 1e-9), 4),
                  "small_over_full_90": _bootstrap(lambda s, f: s / np.maximum(f, 1e-9), [o(small), o(full)]),
                  "full_minus_parent": round(ev[full]["accuracy_short"] - ev["parent"]["accuracy_short"], 4),
                  "full_minus_parent_90": _bootstrap(lambda f, p: f - p, [o(full), o("parent")])}
    return out


def deploy_search(d: Path, k: int, metric: str = "auto", samples: int = 0) -> dict:
    """The run's stage-1 checkpoint, the router's k proposals per budget and their scores under
    `metric` (elastic.deploy_metric; train/deploy_score.deploy_scorer and
    elastic/deploy.deployed_family: what the frozen stage would compute), the family the search
    picks, and whether the run recorded it. `samples`: elastic.deploy_calibration_samples (0: the
    metric's default), to see whether a cheaper search picks the same family."""
    cache = d / (f"deploy_search_{k}_{metric}.json" if not samples else f"deploy_search_{k}_{metric}_n{samples}.json")
    if cache.exists():
        return json.loads(cache.read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dataclasses import replace

    import torch

    from elastic_megatron.config import load_config
    from elastic_megatron.data.tokenizer import load_tokenizer
    from elastic_megatron.elastic.deploy import deployed_family
    from elastic_megatron.elastic.model import ElasticHybrid
    from elastic_megatron.elastic.router import build_router
    from elastic_megatron.elastic.sorting import load_parent
    from elastic_megatron.elastic.subnet import subnet_params
    from elastic_megatron.model.hybrid import build_model, padded_vocab_size
    from elastic_megatron.parallel import (
        ParallelLayout,
        destroy_distributed,
        init_distributed,
    )
    from elastic_megatron.train.checkpoint import latest_checkpoint
    from elastic_megatron.train.deploy_score import deploy_scorer

    cfg = load_config(str(d / "elastic" / "config.yaml"))
    # today's sample count (0: the metric's default), not the one the run's saved config recorded
    cfg = replace(cfg, elastic=replace(cfg.elastic, deploy_candidates=k, deploy_metric=metric,
                                       deploy_calibration_samples=samples))
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
        vocab = padded_vocab_size(cfg.model, tok.vocab_size, 1)
        model = build_model(cfg, layout, vocab, torch.float32)
        ckpts = d / "elastic" / "checkpoints"
        stage1 = load_parent(str(ckpts / f"iter_{cfg.curriculum[0].steps:07d}"), model, cfg, layout)
        recorded = torch.load(latest_checkpoint(ckpts) / "common.pt", weights_only=False)["loop"]["family"]
        router = build_router(cfg, vocab, layer_order=stage1["layer_order"], tp=1)
        router.load_state_dict(stage1["router"])
        st = next(s for s in cfg.curriculum if s.router == "frozen")
        st_cfg = replace(cfg, data=replace(cfg.data, seq_length=st.seq_length or cfg.data.seq_length,
                                           min_steps=st.min_steps or cfg.data.min_steps,
                                           max_steps=st.max_steps or cfg.data.max_steps))
        score = deploy_scorer(ElasticHybrid(model, cfg, layout), model, cfg, st_cfg, tok,
                              st.micro_batch_size or cfg.train.micro_batch_size, vocab)
        record: list = []
        family = deployed_family(router, router.fixed_subnets(cfg.elastic.subnets, 1), cfg.elastic.deploy_tolerance,
                                 score, k, record=record)
        budgets = [{"budget": cfg.elastic.budgets[b], "proposals": [
            {"params": subnet_params(p, cfg.model, vocab), "dropped": [i for i, x in enumerate(p.keep) if not x],
             "subnet": p.to_dict(), "score": [round(x, 4) for x in sc]} for p, sc in zip(props, scores)],
            "router_first_wins": scores.index(min(scores)) == 0} for b, props, scores in record]
        res = {"k": k, "metric": metric, "samples": samples, "budgets": budgets, "same_family_as_run": [s.to_dict() for s in family] == recorded}
    finally:
        destroy_distributed()
    cache.write_text(json.dumps(res))
    return res


def write_md(out: Path, s: dict) -> None:
    lines = ["# Seed study (benchmarks/seeds.py)", "", f"runs: {', '.join(s['runs'])}", "",
             "| budget | " + " | ".join(f"{n} short" for n in s["runs"]) + " | short mean [min, max] ± std |"
             " long mean [min, max] |", "|---" * (len(s["runs"]) + 3) + "|"]
    for b, d in s["budgets"].items():
        sh, lo = d["short"], d["long"]
        lines.append(f"| {b} | " + " | ".join(f"{d['runs'][n]['short']:.3f}" for n in s["runs"]) +
                     f" | {sh['mean']:.3f} [{sh['min']:.3f}, {sh['max']:.3f}] ± {sh['std']:.3f} |"
                     f" {lo['mean']:.3f} [{lo['min']:.3f}, {lo['max']:.3f}] |")
    for n, pr in s.get("paired", {}).items():
        lines.append(f"- {n}, {pr['n']} short problems (paired): " +
                     ", ".join(f"{k} {v:.3f}" for k, v in pr["accuracy"].items()) +
                     f"; smallest / full {pr['small_over_full']:.3f} (90 % {pr['small_over_full_90']}),"
                     f" full - parent {pr['full_minus_parent']:+.3f} (90 % {pr['full_minus_parent_90']})")
    for n, ds in s.get("deploy_search", {}).items():
        for b in ds["budgets"]:
            lines.append(f"- {n} deploy search k={ds['k']} ({ds['metric']}"
                         + (f", {ds['samples']} samples" if ds.get("samples") else "") + f"), {b['budget']}: " + "; ".join(
                f"{p['params']:,} dropped {p['dropped']} " + (f"missed {p['score'][0]}, solution loss {p['score'][1]:.4f}"
                if ds["metric"] != "loss" else f"loss {p['score'][1]:.4f}") for p in b["proposals"]) +
                (" (router's first wins)" if b["router_first_wins"] else " (another proposal wins)"))
        lines.append(f"- {n}: the search deploys {'the same' if ds['same_family_as_run'] else 'another'} family")
    if "variant" in s:
        v = s["variant"]
        lines += ["", f"Variant {v['tag']} ({'; '.join(v['set'])}) on each run's own parent:", ""]
        for b, d in v["summary"]["budgets"].items():
            lines.append(f"- {b}: short " + ", ".join(f"{n} {r['short']:.3f}" for n, r in d["runs"].items()) +
                         f"; mean {d['short']['mean']:.3f}")
        lines.append("- smallest / full: " + ", ".join(f"{n} {r:.2f}" for n, r in v["summary"]["small_over_full"].items())
                     + "; checks: " + ", ".join(f"{k} {x}" for k, x in v["summary"]["checks"].items()))
        for n, pr in v.get("paired", {}).items():
            lines.append(f"- {n}_{v['tag']}, {pr['n']} short problems: smallest / full {pr['small_over_full']:.3f}"
                         f" (90 % {pr['small_over_full_90']}), full - parent {pr['full_minus_parent']:+.3f}"
                         f" (90 % {pr['full_minus_parent_90']}); variant - base: " + ", ".join(
                             f"{b} {x['diff']:+.3f} {x['diff_90']}" for b, x in v["minus_base"][n].items()))
    lines += ["", "smallest / full (short): " + ", ".join(f"{n} {r:.2f}" for n, r in s["small_over_full"].items()),
              "checks: " + ", ".join(f"{k} {v}" for k, v in s["checks"].items()),
              "wall time (s): " + ", ".join(f"{n} {t}" for n, t in s["total_s"].items())]
    (out / "seeds.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_seeds")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--summarize", action="store_true", help="train nothing: summarize the runs already there")
    p.add_argument("--add", action="append", default=[], help="NAME=DIR: a finished demo dir to use as run NAME")
    p.add_argument("--eval-short", type=int, default=0, help="also evaluate every run on N short problems, paired")
    p.add_argument("--deploy-search", type=int, default=0, help="replay the deploy search with K proposals")
    p.add_argument("--deploy-metric", default="auto", choices=("auto", "exact", "solution", "loss"),
                   help="what --deploy-search scores the proposals on (elastic.deploy_metric)")
    p.add_argument("--deploy-samples", type=int, default=0,
                   help="problems (or sequences) --deploy-search scores on (elastic.deploy_calibration_samples; 0: default)")
    p.add_argument("--variant", default="", help="TAG: rerun the elastic part of every run with --set, on the "
                   "run's own trained parent, as run NAME_TAG (compared with NAME paired on the same problems)")
    p.add_argument("--set", action="append", default=[], help="a demo override for --variant, e.g. "
                   "'curriculum.0.budget_probs=[0.2,0.35,0.45]'")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in a.runs.split(",") if n.strip()]
    bad = [n for n in names if n not in RUNS]
    if bad:
        p.error(f"unknown run(s) {bad}: choose from {', '.join(RUNS)}")
    dirs = {n: out / n for n in names}
    for spec in a.add:
        n, _, d = spec.partition("=")
        if n not in RUNS or not d:
            p.error(f"--add {spec!r}: expected NAME=DIR with NAME one of {', '.join(RUNS)}")
        dirs[n] = Path(d)
    if not a.summarize:
        for n, d in dirs.items():
            if not (d / "report.json").exists():
                run_one(out, n)
    if a.variant and not a.set:
        p.error("--variant needs at least one --set override")
    variants = {}  # base run -> its variant's dir
    for n in list(dirs) if a.variant else []:
        vd = out / f"{n}_{a.variant}"
        if not (vd / "report.json").exists() and not a.summarize:
            run_one(out, n, vd, a.set, parent_from=dirs[n])
        variants[n] = vd
    reports = {n: json.loads((d / "report.json").read_text()) for n, d in dirs.items() if (d / "report.json").exists()}
    if not reports:
        print("no finished runs to summarize", file=sys.stderr)
        return 1
    s = summarize(reports)
    if a.eval_short:
        evals = {n: reevaluate(dirs[n], a.eval_short) for n in reports}
        s["paired"] = paired(evals)
    if a.deploy_search > 1:
        s["deploy_search"] = {n: deploy_search(dirs[n], a.deploy_search, a.deploy_metric, a.deploy_samples)
                              for n in reports}
    done = {n: d for n, d in variants.items() if (d / "report.json").exists() and n in reports}
    if done:
        v = summarize({n: json.loads((d / "report.json").read_text()) for n, d in done.items()})
        s["variant"] = {"tag": a.variant, "set": a.set, "summary": v}
        if a.eval_short:  # the variant against its base run, on the same parent and the same problems
            vev = {n: reevaluate(d, a.eval_short) for n, d in done.items()}
            s["variant"]["paired"] = paired(vev)
            s["variant"]["minus_base"] = {
                n: {b: {"diff": round(vev[n][b]["accuracy_short"] - evals[n][b]["accuracy_short"], 4),
                        "diff_90": _bootstrap(lambda x, y: x - y, [vev[n][b]["outcomes_short"],
                                                                   evals[n][b]["outcomes_short"]])}
                    for b in vev[n] if b != "parent"} for n in done}
    write_md(out, s)
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
