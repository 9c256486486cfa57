"""The GPU check: run it once on a CUDA machine, bare or not; it prints one JSON line at the end.

    bash benchmarks/gpu_check.sh [--wheels DIR] [--skip-tests]     # or: python benchmarks/gpu_check.py

Parts, each in its own process with its own time limit (a hang or a CUDA fault in one is recorded
and the rest still run); the result so far is rewritten to $GPU_CHECK_JSON (default
$OUT/gpu_check.json, else /tmp/gpu_check.json) after every part, so even a killed run leaves it:

1. `env`: versions, and the backend ladder's verdict per rung (compat/backends.py).
2. `tests_gpu`: `pytest tests/gpu` (mamba-ssm's Triton kernels vs our scan, each usable backend
   against the CPU path, an elastic run in bf16 on the GPU).
3. `tiny_pipeline`: train -> importance -> elastic-train -> slice -> generate through the CLI with
   model.backend=auto (the best rung here), bf16, train.recompute=full; losses and the rung used.
4. `one_b`: a ~1B-parameter parent on the best rung (bf16, recomputation): the training step at
   100 / 75 / 50 % of its parameters through the elastic forward against megatron's own forward,
   and peak GPU memory per variant beside the memory planner's figures for that step.

Budget: under 8 minutes on one H100 (limits below add to 7.5 minutes). Without CUDA it says so
and exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# ~1.0B parameters (979M): 28 layers (13 Mamba, 2 attention, 13 MLP), hidden 2048 (vocab 32768)
ONE_B = ["model.hybrid_override_pattern=M-M-M-M*-M-M-M-M*-M-M-M-M-M-", "model.hidden_size=2048",
         "model.ffn_hidden_size=8192", "model.num_attention_heads=16", "model.num_query_groups=8",
         "model.kv_channels=128", "model.mamba_num_heads=64", "model.mamba_head_dim=64",
         "model.mamba_num_groups=8", "model.mamba_state_dim=128", "model.max_sequence_length=8192",
         "train.precision=bf16", "train.recompute=full", "model.backend=auto"]
VOCAB, BATCH, SEQ = 32768, 1, 4096
LIMITS_S = {"env": 30, "tests_gpu": 160, "tiny_pipeline": 130, "one_b": 140}  # 7.7 min in all
GPU_TINY = ["train.eval_interval=0", "logging.progress=false", "logging.wandb_mode=disabled",
            "model.backend=auto", "train.precision=bf16", "train.recompute=full"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}


def run(cmd: list[str], timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr tail); a timeout is exit 124 like coreutils' timeout."""
    try:
        p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return 124, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            f"timed out after {timeout:.0f} s"
    return p.returncode, p.stdout, p.stderr[-4000:]


# ----------------------------------------------------------------------------- the parts


def part_env() -> dict:
    import importlib.metadata as md

    import torch

    from elastic_megatron.compat import backends

    versions = {}
    for dist in ("torch", "triton", "megatron-core", "mamba-ssm", "transformer-engine", "causal-conv1d",
                 "transformers", "omegaconf", "wandb"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    p = backends.probe()
    return {"ok": True, "python": sys.version.split()[0], "versions": versions, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "ladder": {"te": p.te or "usable", "triton": p.triton or "usable"},
            "auto": backends.describe(backends.choose("auto", p), p)}


def part_tests_gpu() -> dict:
    rc, out, err = run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"],
                       LIMITS_S["tests_gpu"] - 5)
    lines = (out + err).splitlines()
    summary = [x for x in lines if " passed" in x or " failed" in x or " error" in x or "skipped" in x]
    failed = [x for x in lines if x.startswith(("FAILED", "ERROR", "SKIPPED"))]
    return {"ok": rc == 0, "rc": rc, "summary": summary[-1] if summary else (out + err)[-300:],
            "not_passed": failed[:12], **({} if rc == 0 else {"log": (out + err)[-1500:]})}


def part_tiny_pipeline(extra: list[str] = (), steps: int = 20) -> dict:
    """The CLI end to end; `extra` / `steps` let the CPU test run the same code small."""
    fast = [*GPU_TINY, *extra]
    cli = [sys.executable, "-m", "elastic_megatron.cli"]
    res: dict = {"ok": False}
    with tempfile.TemporaryDirectory() as d:
        cmds = [("train", ["train", *fast, f"train.steps={steps}", f"logging.out_dir={d}/p"]),
                ("importance", ["importance", *fast, "elastic.importance_batches=2", f"checkpoint.load={d}/p",
                                f"logging.out_dir={d}/i"]),
                ("elastic-train", ["elastic-train", "--config", f"{d}/i/sorted/config.yaml",
                                   f"checkpoint.load={d}/i/sorted/checkpoints", *fast,
                                   "curriculum=[{name: short, steps: 4}]", f"logging.out_dir={d}/e"]),
                ("slice", ["slice", "--checkpoint", f"{d}/e", "--out", f"{d}/family", *fast]),
                ("generate", ["generate", "--checkpoint", f"{d}/e", "--budget", "0.5", "--prompt", "12+7=",
                              "--max-new", "8", *fast])]
        t0 = time.perf_counter()
        for name, args in cmds:
            rc, out, err = run([*cli, *args], max(10.0, LIMITS_S["tiny_pipeline"] - 5 - (time.perf_counter() - t0)))
            said = [x for x in err.splitlines() if x.startswith("elastic-megatron: backend ")]
            if said and "backend" not in res:
                res["backend"] = said[0][len("elastic-megatron: "):]
            if rc:
                return {**res, "failed": name, "rc": rc, "log": (out + err)[-1500:]}
            res[f"{name}_s"] = round(time.perf_counter() - t0, 1)
            if name == "generate":
                res["generated"] = out.strip().splitlines()[-1][:80] if out.strip() else ""
        recs = [json.loads(x) for x in Path(f"{d}/e/metrics.jsonl").read_text().splitlines()]
        res["elastic_losses"] = [round(r["loss"], 4) for r in recs if "loss" in r]
        res["sliced"] = sorted(p.name for p in Path(f"{d}/family").iterdir() if p.is_dir())
        res["ok"] = True
    return res


def part_one_b() -> dict:
    import torch

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
        out = {"backend": resolve_backend(m.backend)}
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

        out.update(params=params, batch=BATCH, seq=SEQ)
        times, peaks = {}, {}
        for v in ("megatron", *subnets):
            for _ in range(2):
                step(v)  # warm-up (Triton autotuning, allocator)
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

        from elastic_megatron.compat import backends

        kernels = "fused" if backends.mamba_kernels(out["backend"], backends.probe()) == "triton" else "torch"
        pl = rank_memory(cfg, VOCAB, 1, 1, 1, Phase("step", SEQ, BATCH, BATCH, False), cfg.train.recompute, False, 2,
                         kernels=kernels)
        out["planner_kernels"] = kernels
        out["planner_gib"] = {"weights": round(pl["weights"] / 2**30, 2), "grads_bf16": round(pl["weights"] / 2**30, 2),
                              "activations_plus_logits": round((pl["activations"] + pl["logits"]) / 2**30, 2),
                              "backward": round(pl["backward"] / 2**30, 2)}  # the kernels' working set
        out["ratio_50_vs_100"] = round(times["elastic_50"] / times["elastic_100"], 3)
        out["ratio_75_vs_100"] = round(times["elastic_75"] / times["elastic_100"], 3)
        out["ratio_elastic_vs_megatron"] = round(times["elastic_100"] / times["megatron"], 3)
        out["ok"] = True
        return out
    finally:
        destroy_distributed()


PARTS = {"env": part_env, "tests_gpu": part_tests_gpu, "tiny_pipeline": part_tiny_pipeline, "one_b": part_one_b}


def _run_part(name: str) -> dict:
    """One part in a child process, so its time limit holds and a CUDA fault stays in it."""
    rc, out, err = run([sys.executable, str(Path(__file__).resolve()), "--part", name], LIMITS_S[name])
    last = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        res = json.loads(last)
    except ValueError:
        res = {"ok": False, "rc": rc, "error": "timed out" if rc == 124 else "no result", "log": err[-1500:]}
    return res


def _save(res: dict) -> None:
    path = Path(os.environ.get("GPU_CHECK_JSON") or Path(os.environ.get("OUT") or "/tmp") / "gpu_check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")


def main(argv: list[str]) -> int:
    if "--part" in argv:  # the child: one part, one JSON line
        name = argv[argv.index("--part") + 1]
        try:
            res = PARTS[name]()
        except BaseException as e:  # KeyError for an unknown part, SystemExit from a CLI, ...  # recorded by the parent, which goes on
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500]}
        print(json.dumps(res), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "message": "no CUDA device: nothing to check here (run on a GPU machine)"}))
        return 0
    t0 = time.perf_counter()
    res = {"cuda": True, "partial": True}
    for name in PARTS:
        if name == "tests_gpu" and "--skip-tests" in argv:
            continue
        t = time.perf_counter()
        res[name] = _run_part(name)
        res[name]["wall_s"] = round(time.perf_counter() - t, 1)
        _save(res)
    res["partial"] = False
    res["failed_parts"] = [n for n in PARTS if isinstance(res.get(n), dict) and res[n].get("ok") is False]
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    _save(res)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
