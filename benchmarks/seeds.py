"""Seed study (issue 23): the demo's family over training seeds, mean ± spread per budget.

    python benchmarks/seeds.py --out bench_seeds                      # all four runs (~35-40 min, 2 cores)
    python benchmarks/seeds.py --out bench_seeds --runs seed1234      # one run; the others later
    python benchmarks/seeds.py --out bench_seeds --summarize           # only read the runs already there
    python benchmarks/seeds.py --out bench_seeds --add seed1234=/tmp/demo_out   # reuse a finished demo dir

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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = {"seed1234": (1234, "2"), "seed4321": (4321, "2"), "seed777": (777, "2"), "seed1234_omp1": (1234, "1")}


def run_one(out: Path, name: str) -> None:
    seed, threads = RUNS[name]
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    cmd = [sys.executable, "-m", "elastic_megatron.cli", "demo", "--out", str(out / name), f"train.seed={seed}"]
    tic = time.time()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"{name}: {time.time() - tic:.0f} s", flush=True)


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


def write_md(out: Path, s: dict) -> None:
    lines = ["# Seed study (benchmarks/seeds.py)", "", f"runs: {', '.join(s['runs'])}", "",
             "| budget | " + " | ".join(f"{n} short" for n in s["runs"]) + " | short mean [min, max] ± std |"
             " long mean [min, max] |", "|---" * (len(s["runs"]) + 3) + "|"]
    for b, d in s["budgets"].items():
        sh, lo = d["short"], d["long"]
        lines.append(f"| {b} | " + " | ".join(f"{d['runs'][n]['short']:.3f}" for n in s["runs"]) +
                     f" | {sh['mean']:.3f} [{sh['min']:.3f}, {sh['max']:.3f}] ± {sh['std']:.3f} |"
                     f" {lo['mean']:.3f} [{lo['min']:.3f}, {lo['max']:.3f}] |")
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
    reports = {n: json.loads((d / "report.json").read_text()) for n, d in dirs.items() if (d / "report.json").exists()}
    if not reports:
        print("no finished runs to summarize", file=sys.stderr)
        return 1
    s = summarize(reports)
    write_md(out, s)
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
