"""The GPU check: run it once on a CUDA machine; it prints one JSON line.

    bash benchmarks/gpu_check.sh          # or: python benchmarks/gpu_check.py [--skip-tests]

1. `pytest tests/gpu` (the CUDA-only tests: mamba-ssm vs our scan, TE vs local layers, an elastic
   run on the GPU); 2. the tiny pipeline through the CLI on the GPU with the Transformer Engine
   spec, bf16 and train.recompute=full (train -> importance -> elastic-train), its losses; 3. a
   ~1B-parameter parent (TE spec, bf16, recomputation on): the training step (forward with labels,
   backward) at 100 / 75 / 50 % of its parameters through the elastic forward against megatron's
   own forward, and peak GPU memory per variant beside the memory planner's figures for that step.
Without CUDA it says so and exits 0.
Budget: under 8 minutes on one H200.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# ~1.0B parameters (979M): 28 layers (13 Mamba, 2 attention, 13 MLP), hidden 2048 (vocab 32768)
ONE_B = ["model.hybrid_override_pattern=M-M-M-M*-M-M-M-M*-M-M-M-M-M-", "model.hidden_size=2048",
         "model.ffn_hidden_size=8192", "model.num_attention_heads=16", "model.num_query_groups=8",
         "model.kv_channels=128", "model.mamba_num_heads=64", "model.mamba_head_dim=64",
         "model.mamba_num_groups=8", "model.mamba_state_dim=128", "model.max_sequence_length=8192",
         "train.precision=bf16", "train.recompute=full", "model.backend=auto"]
VOCAB, BATCH, SEQ = 32768, 1, 4096


def run(cmd: list[str], timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, (p.stdout + p.stderr)[-4000:]


def pytest_gpu() -> dict:
    rc, log = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], 300)
    last = [x for x in log.splitlines() if "passed" in x or "failed" in x or "error" in x]
    return {"rc": rc, "summary": last[-1] if last else log[-300:]}


def tiny_pipeline() -> dict:
    fast = ["train.eval_interval=0", "logging.progress=false", "logging.wandb_mode=disabled",
            "model.backend=te", "train.precision=bf16", "train.recompute=full"]
    cli = [sys.executable, "-m", "elastic_megatron.cli"]
    with tempfile.TemporaryDirectory() as d:
        steps = [["train", *fast, "train.steps=20", f"logging.out_dir={d}/p"],
                 ["importance", *fast, f"checkpoint.load={d}/p", f"logging.out_dir={d}/i"],
                 ["elastic-train", "--config", f"{d}/i/sorted/config.yaml", f"checkpoint.load={d}/i/sorted/checkpoints",
                  *fast, "curriculum=[{name: short, steps: 4}]", f"logging.out_dir={d}/e"]]
        for args in steps:
            rc, log = run([*cli, *args], 300)
            if rc:
                return {"ok": False, "failed": args[0], "log": log[-1500:]}
        recs = [json.loads(x) for x in Path(f"{d}/e/metrics.jsonl").read_text().splitlines()]
        return {"ok": True, "elastic_losses": [round(r["loss"], 4) for r in recs if "loss" in r]}


def one_b_steps() -> dict:
    from elastic_megatron.config import load_config
    from elastic_megatron.elastic.model import ElasticHybrid
    from elastic_megatron.elastic.subnet import Subnet, homogeneous_for_target
    from elastic_megatron.model.hybrid import build_model, count_parameters
    from elastic_megatron.model.recompute import recompute_megatron_layers
    from elastic_megatron.model.spec import resolve_backend
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29711")
    cfg = load_config(None, ONE_B)
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    try:
        m = cfg.model
        model = build_model(cfg, layout, VOCAB, torch.bfloat16).train()
        recompute_megatron_layers(model, cfg.train.recompute)
        params = count_parameters(m, VOCAB)
        view = ElasticHybrid(model, cfg, layout)
        subnets = {"elastic_100": Subnet.full(m), "elastic_75": homogeneous_for_target(m, VOCAB, 0.75 * params),
                   "elastic_50": homogeneous_for_target(m, VOCAB, 0.5 * params)}
        g = torch.Generator(device="cuda").manual_seed(0)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda", generator=g)
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda", generator=g)
        pos = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)

        def step(v):
            model.zero_grad(set_to_none=True)
            loss = (model(tokens, pos, None, labels=labels) if v == "megatron" else
                    view(tokens, pos, labels, subnet=subnets[v])).float().mean()
            loss.backward()

        out = {"params": params, "backend": resolve_backend(m.backend), "batch": BATCH, "seq": SEQ}
        times, peaks = {}, {}
        for v in ("megatron", *subnets):
            for _ in range(2):
                step(v)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                step(v)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            times[v] = sorted(ts)[2] * 1e3
            peaks[v] = torch.cuda.max_memory_allocated() / 2**30
        out["step_ms"] = {k: round(x, 1) for k, x in times.items()}
        out["peak_gib"] = {k: round(x, 2) for k, x in peaks.items()}
        # The planner's figures for this step (parent phase, one rank), to set beside peak_gib: the
        # measured peak holds the bf16 weights, their bf16 .grad (no DDP here) and the step itself.
        from elastic_megatron.plan import Phase, rank_memory

        pl = rank_memory(cfg, VOCAB, 1, 1, 1, Phase("step", SEQ, BATCH, BATCH, False), cfg.train.recompute, False, 2)
        out["planner_gib"] = {"weights": round(pl["weights"] / 2**30, 2), "grads_bf16": round(pl["weights"] / 2**30, 2),
                              "activations_plus_logits": round((pl["activations"] + pl["logits"]) / 2**30, 2),
                              "backward": round(pl["backward"] / 2**30, 2)}  # the fused kernels' working set
        out["ratio_50_vs_100"] = round(times["elastic_50"] / times["elastic_100"], 3)
        out["ratio_75_vs_100"] = round(times["elastic_75"] / times["elastic_100"], 3)
        out["ratio_elastic_vs_megatron"] = round(times["elastic_100"] / times["megatron"], 3)
        return out
    finally:
        destroy_distributed()


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "message": "no CUDA device: nothing to check here (run on a GPU machine)"}))
        return 0
    t0 = time.perf_counter()
    res = {"cuda": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (("tests_gpu", pytest_gpu), ("tiny_pipeline_te_bf16_recompute", tiny_pipeline),
                     ("one_b", one_b_steps)):
        if name == "tests_gpu" and "--skip-tests" in sys.argv:
            continue
        try:
            res[name] = fn()
        except Exception as e:  # record and go on: one JSON line whatever fails
            res[name] = {"error": f"{type(e).__name__}: {e}"[:1500]}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
