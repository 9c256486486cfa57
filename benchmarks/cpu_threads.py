"""How to spend a CPU box's cores on training: threads (libgomp's default wait or spinning), or ranks.

    python benchmarks/cpu_threads.py --demo demo_out             # ~20 min on 2 idle cores
    python benchmarks/cpu_threads.py --demo demo_out --rounds 1 --steps 4   # smoke test
    python benchmarks/cpu_threads.py --jobs parent,parent_long --steps 30  # the parent's phases only

Three ways, every run a fresh process:

    threads          one process, OMP_NUM_THREADS = cores, libgomp's default wait (a worker spins a
                     short while after a parallel region, then sleeps)
    threads_active   the same with OMP_WAIT_POLICY=ACTIVE (workers spin until the next region):
                     what `elastic-megatron demo` sets unless OMP_WAIT_POLICY is already set
    ranks            `torchrun --nproc_per_node=cores`, one thread per rank (gloo data parallelism:
                     each rank runs its share of the micro-batches, megatron DDP sums the gradients);
                     how the demo trains its parent (elastic_megatron/local_ranks.py)

on three jobs of the demo (`--jobs`), in alternating rounds:

    parent       `train` with the demo's short-phase settings, from scratch (16 x 128 tokens per step)
    parent_long  the same with the long phase's data: 2-6-step problems, 16 x 256 tokens per step
                 (from scratch: a step's time does not depend on the weights)
    sliced       `elastic-train` from the demo's sorted parent (DIR/elastic/config.yaml): 2 router steps,
                 then the frozen "small" stage, the deployed family trained sliced and weighted to
                 the smallest (DIR must hold a finished demo)

It reports each way's median step over all its rounds (the first two steps of a run left out), its
ratio to `threads`, and whether its per-step losses equal those of `threads` bit for bit. The wait
policy only changes when threads sleep. Data parallelism changes how the micro-batches' gradients
are summed: exact for plain linear layers (a + b), not for the sliced ones, whose weight gradient
accumulates into the buffer inside the GEMM (addmm).
The last stdout line is one JSON object (docs/performance.md records a run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(ranks: int, threads: int, args: list[str], out: Path, wait: str | None = None) -> list[dict]:
    """One training run in a fresh process (or torchrun's ranks); returns its per-step metrics."""
    shutil.rmtree(out, ignore_errors=True)
    cli = ["-m", "elastic_megatron.cli", *args, f"logging.out_dir={out}", "logging.wandb_mode=disabled",
           "logging.progress=false"]
    cmd = [sys.executable, *cli] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cli]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_NUM_THREADS=str(threads), **({"OMP_WAIT_POLICY": wait} if wait else {}))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step_s" in r]


def _job(name: str, args: list[str], stage: str | None, cores: int, rounds: int, tmp: Path) -> dict:
    ways = {"threads": (1, cores, None), "threads_active": (1, cores, "ACTIVE"), "ranks": (cores, 1, None)}
    steps = {w: [] for w in ways}
    losses = {}
    for r in range(rounds):
        for way, (ranks, threads, wait) in ways.items():
            rows = _run(ranks, threads, args, tmp / f"{name}_{way}", wait)
            losses[way] = [x["loss"] for x in rows]
            timed = [x for x in rows[2:] if stage is None or x.get("stage") == stage]
            steps[way] += [x["step_s"] for x in timed]
            print(f"[{name}] round {r + 1} {way}: median step {statistics.median(steps[way]):.3f} s",
                  file=sys.stderr, flush=True)
    med = {w: round(statistics.median(v), 4) for w, v in steps.items()}
    return {"median_step_s": med, "ratio_vs_threads": {w: round(med[w] / med["threads"], 3) for w in ways},
            "same_losses_as_threads": {w: losses[w] == losses["threads"] for w in ways},
            "steps_timed": {w: len(v) for w, v in steps.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="", help="a finished demo's output directory (for the sliced job)")
    ap.add_argument("--jobs", default="parent,parent_long,sliced", help="comma-separated, of parent, parent_long, sliced")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="steps per run (sliced: of the small stage)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    jobs = args.jobs.split(",")
    if not set(jobs) <= {"parent", "parent_long", "sliced"}:
        raise SystemExit(f"--jobs {args.jobs}: choose from parent, parent_long, sliced")
    demo = Path(args.demo).resolve()
    el_cfg = demo / "elastic" / "config.yaml"
    sorted_ckpt = demo / "importance" / "sorted" / "checkpoints" / "iter_0000000"
    if "sliced" in jobs and not (args.demo and el_cfg.exists() and sorted_ckpt.exists()):
        raise SystemExit(f"{el_cfg} or {sorted_ckpt} not found: the sliced job needs --demo, the output directory of "
                         "a finished demo")
    parent = [f"train.steps={args.steps}", "train.eval_interval=0", "train.lr=3e-3", "train.warmup_steps=20",
              "data.min_steps=2", "data.max_steps=3", "data.seq_length=128", "checkpoint.save_interval=0"]
    parent_long = [*parent, "data.max_steps=6", "data.seq_length=256"]
    small = json.dumps([{"name": "short", "steps": 2},
                        {"name": "small", "steps": args.steps, "budget_probs": [0.2, 0.2, 0.6], "router": "frozen"}])
    # the demo's config names its paths relative to where it ran: point them at DIR
    sliced = ["--config", str(el_cfg), f"curriculum={small}", f"checkpoint.load={sorted_ckpt}",
              f"elastic.importance_path={demo / 'importance' / 'importance.pt'}"]
    with tempfile.TemporaryDirectory(prefix="cpu_threads_") as tmp:
        argv = {"parent": (["train", *parent], None), "parent_long": (["train", *parent_long], None),
                "sliced": (["elastic-train", *sliced], "small")}
        result = {"cores": args.cores, "rounds": args.rounds, "steps": args.steps,
                  **{j: _job(j, argv[j][0], argv[j][1], args.cores, args.rounds, Path(tmp)) for j in jobs}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
