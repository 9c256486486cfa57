"""Peak memory of `import-hf` and `export-hf`, per process, at TP=1 and TP=2 (CPU, gloo).

    python benchmarks/hf_convert_memory.py [--size medium|large] [--keep DIR]

A random NemotronH is written by transformers in bf16 (as released checkpoints are), then
converted both ways as a user runs it: `elastic-megatron import-hf` (the run's fp32 copy is what a
rank holds) and `elastic-megatron export-hf --budget 1.0` (back to bf16), each under torchrun with
--nproc_per_node = TP. Every measurement runs in its own process tree, whose largest process's peak
RSS (getrusage of the waited-for children) is the figure, beside its sampled peak anonymous RSS
(without the file pages of the memory-mapped safetensors, which a node's ranks share). The baseline is a process that imports
the same code and converts nothing, so `peak - baseline` is what conversion itself costs, to be
read against the model's size. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# medium: the elastic_cost.py medium parent's shape; large: ~10x, so conversion dwarfs the interpreter
SIZES = {
    "medium": dict(hidden_size=768, intermediate_size=4096, mamba_num_heads=24, mamba_head_dim=64, n_groups=4,
                   num_attention_heads=12, num_key_value_heads=4, head_dim=64, pattern="M-M*-M-M*-M-"),
    "large": dict(hidden_size=2048, intermediate_size=8192, mamba_num_heads=64, mamba_head_dim=64, n_groups=8,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, pattern="M-M*-M-M*-M-M-M*-M-M*-M-"),
}
TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}


def _tree(root: int) -> list[int]:
    """root and its descendants, from /proc (no psutil needed)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        out += frontier
    return out


def _anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def _peak(cmd: list[str]) -> tuple[int, int]:
    """(peak RSS, peak anonymous RSS) in bytes of the largest process of `cmd`'s tree. The RSS peak is
    exact (getrusage of the waited-for children, from a fresh parent process); the anonymous part
    (RSS less the file pages of memory-mapped checkpoints, which the page cache shares between the
    ranks of a node) is sampled every 20 ms from /proc."""
    import time

    probe = ("import resource, subprocess, sys, json; "
             f"r = subprocess.run({cmd!r}, capture_output=True, text=True); "
             "sys.stderr.write(r.stderr[-3000:] if r.returncode else ''); "
             "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    anon = 0
    while proc.poll() is None:
        anon = max([anon, *(_anon_kib(p) for p in _tree(proc.pid)[1:])])
        time.sleep(0.02)
    out, err = proc.communicate()
    rc, kib = json.loads(out.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{err}")
    return kib * 1024, anon * 1024


def _make_hf(path: Path, size: str) -> int:
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    s = dict(SIZES[size])
    pattern = s.pop("pattern")
    cfg = NemotronHConfig(vocab_size=32768, layers_block_type=[TYPES[c] for c in pattern], ssm_state_size=128,
                          max_position_embeddings=4096, **s)
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(str(path), max_shard_size="500MB")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="large")
    ap.add_argument("--keep", default="", help="work directory to keep (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="hfmem_"))
    src = work / "src"
    params = _make_hf(src, args.size)
    print(f"[hf_convert_memory] {args.size}: {params:,} parameters ({params * 2 / 2**20:.0f} MiB bf16, "
          f"{params * 4 / 2**20:.0f} MiB fp32)", file=sys.stderr)
    py = sys.executable
    baseline, baseline_anon = _peak([py, "-c", "import elastic_megatron.formats.hf_jobs, elastic_megatron.elastic.jobs, "
                                               "transformers"])
    result = {"size": args.size, "params": params, "baseline_mib": baseline / 2**20,
              "baseline_anon_mib": baseline_anon / 2**20, "runs": {}}
    common = ["logging.wandb_mode=disabled", "logging.progress=false", "model.backend=local"]
    for tp in (1, 2):
        run = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}", "-m", "elastic_megatron.cli"]
        imp, imp_anon = _peak([*run, "import-hf", str(src), "--out", str(work / f"run_tp{tp}"), *common, f"parallel.tensor={tp}"])
        exp, exp_anon = _peak([*run, "export-hf", "--checkpoint", str(work / f"run_tp{tp}"), "--budget", "1.0", "--out",
                     str(work / f"exp_tp{tp}"), "--max-shard-size", "500MB", *common, f"parallel.tensor={tp}"])
        result["runs"][f"tp{tp}"] = {"import_peak_mib": imp / 2**20, "export_peak_mib": exp / 2**20,
                                     "import_over_baseline_mib": (imp - baseline) / 2**20,
                                     "export_over_baseline_mib": (exp - baseline) / 2**20,
                                     "import_anon_over_baseline_mib": (imp_anon - baseline_anon) / 2**20,
                                     "export_anon_over_baseline_mib": (exp_anon - baseline_anon) / 2**20}
        print(f"[hf_convert_memory] TP={tp}: import peak {imp / 2**20:.0f} MiB (anonymous {imp_anon / 2**20:.0f}), "
              f"export peak {exp / 2**20:.0f} MiB (anonymous {exp_anon / 2**20:.0f}); baseline {baseline / 2**20:.0f} "
              f"MiB (anonymous {baseline_anon / 2**20:.0f})", file=sys.stderr)
    shard_fp32 = {tp: params * 4 / tp / 2**20 for tp in (1, 2)}
    result["fp32_model_mib_per_rank"] = {f"tp{tp}": v for tp, v in shard_fp32.items()}
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
