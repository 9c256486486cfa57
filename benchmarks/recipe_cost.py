"""Step time of the default elastic recipe vs pure hard routing, per curriculum stage, side by side.

    python benchmarks/recipe_cost.py                 # tiny parent, 6 + 4 steps per run, 2 rounds
    python benchmarks/recipe_cost.py --rounds 3 --stage1 8 --stage2 6

The recipes (docs/architecture.md, "the default recipe"):

    hard     elastic.mode=hard in both stages, the router learning throughout (the old default)
    default  soft routing in stage 1 (router: learn), the deployed family frozen and sliced in stage 2

One process trains a short parent and sorts it (importance), then runs `elastic-train` for each
recipe in turn, `--rounds` times (hard, default, hard, default, ...: slow periods of a noisy machine
hit both), each run from the same sorted parent with the demo's stage shapes (stage 1: seq 128,
global batch 16; stage 2: seq 768, global batch 8). A step's time is the wall time the loop logs
(step_s). Reported per stage: the median step time of each recipe over all its runs' steps
except each stage's first (warm-up), and default / hard. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elastic_megatron.cli import main as em  # noqa: E402

FAST = ["logging.wandb_mode=disabled", "logging.progress=false", "train.eval_interval=0"]
RECIPES = {"hard": ["elastic.mode=hard", "curriculum.1.router=learn"], "default": []}


def say(msg: str) -> None:
    print(f"[recipe_cost] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="runs of each recipe, interleaved")
    ap.add_argument("--stage1", type=int, default=6, help="stage-1 steps per run")
    ap.add_argument("--stage2", type=int, default=4, help="stage-2 steps per run")
    ap.add_argument("--out", default="", help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="recipe_cost_"))
    say(f"parent + importance in {root}")
    assert em(["train", *FAST, "train.steps=20", f"logging.out_dir={root / 'parent'}"]) == 0
    assert em(["importance", *FAST, "elastic.importance_batches=2", f"checkpoint.load={root / 'parent'}",
               f"logging.out_dir={root / 'imp'}"]) == 0
    sorted_args = ["--config", str(root / "imp" / "sorted" / "config.yaml"),
                   f"checkpoint.load={root / 'imp' / 'sorted' / 'checkpoints'}"]
    stages = [f"curriculum.0.steps={args.stage1}", f"curriculum.1.steps={args.stage2}"]
    times: dict[str, dict[str, list[float]]] = {r: {"short": [], "long": []} for r in RECIPES}
    for k in range(args.rounds):
        for recipe, extra in RECIPES.items():
            out = root / f"{recipe}_{k}"
            say(f"round {k + 1}/{args.rounds}: {recipe}")
            assert em(["elastic-train", *sorted_args, *FAST, *stages, *extra, f"logging.out_dir={out}"]) == 0
            recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            for stage in ("short", "long"):
                steps = [r for r in recs if r["stage"] == stage][1:]  # the stage's first step warms up
                times[recipe][stage] += [r["step_s"] for r in steps]
    result = {"rounds": args.rounds, "steps": {"short": args.stage1, "long": args.stage2}}
    for stage in ("short", "long"):
        med = {r: statistics.median(times[r][stage]) for r in RECIPES}
        result[stage] = {"hard_s": round(med["hard"], 4), "default_s": round(med["default"], 4),
                         "default_over_hard": round(med["default"] / med["hard"], 3),
                         "n": {r: len(times[r][stage]) for r in RECIPES}}
        say(f"{stage}: hard {med['hard']:.3f} s/step, default {med['default']:.3f} s/step, "
            f"default/hard {med['default'] / med['hard']:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
