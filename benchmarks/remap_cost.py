"""What the CPU's cuda-to-cpu remap costs, and what leaving it out of the hot paths saves.

    python benchmarks/remap_cost.py            # ~1 min on 2 idle CPU cores
    python benchmarks/remap_cost.py --rounds 3 # smoke test

compat/cpu.py enters a TorchFunctionMode (only without CUDA) that turns megatron's `cuda` tensors
into CPU ones; every torch call made from Python passes through it. `compat.native()` leaves it out
of a micro-batch's forward and backward, decoding and evaluation. This times, on the demo's parent
(world 1, gloo, fp32, megatron DDP as the training loop wraps it), side by side in one process:

    train_step   one optimizer step the way train/loop.py runs it: run_schedule over 2 micro-batches
                 of 8 x 128 tokens (forward, loss, backward), then megatron's optimizer step
    decode_step  one CachedDecoder step (inference.py) for a batch of 8, as evaluation decodes

each with the hot paths native (as shipped) and with native() made a no-op (the remap everywhere,
as before). Variants alternate round by round and each reports its median; the losses of the two
training variants must be equal bit for bit (the remap only moves devices; it never changes math).
The last stdout line is one JSON object (docs/performance.md records a run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()

    from elastic_megatron.compat import cpu
    from elastic_megatron.demo import demo_config
    from elastic_megatron.inference import CachedDecoder
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed
    from elastic_megatron.train.loop import lm_forward_step, run_schedule
    from elastic_megatron.train.optim import build_optimizer, wrap_ddp

    if cpu._MODE is None and torch.cuda.is_available():
        raise SystemExit("the remap is installed only without CUDA: nothing to measure here")
    cfg = demo_config(Path("/tmp/remap_cost"), [])
    layout = ParallelLayout.resolve(cfg, 1, training=True)
    init_distributed(layout, cfg.train.seed)
    try:
        model = build_model(cfg, layout, 64, torch.float32)
        ddp = wrap_ddp(model, layout)
        opt = build_optimizer(ddp, cfg.train, layout, torch.float32)
        g = torch.Generator().manual_seed(0)
        mbs, seq = cfg.train.micro_batch_size, cfg.data.seq_length
        n_micro = cfg.train.global_batch_size // mbs

        def batch():
            t = torch.randint(0, 64, (mbs, seq), generator=g)
            return {"tokens": t, "labels": t.roll(-1, 1), "loss_mask": torch.ones(mbs, seq),
                    "position_ids": torch.arange(seq).expand(mbs, seq)}

        data = [batch() for _ in range(n_micro)]
        state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

        def train_step():
            model.load_state_dict(state, strict=False)  # the same step every time, outside the timing
            ddp.zero_grad_buffer()
            opt.zero_grad()
            t = time.perf_counter()
            losses = run_schedule(ddp, lm_forward_step, iter(data), n_micro, cfg, seq)
            opt.step()
            return time.perf_counter() - t, float(sum(d["lm loss"] for d in losses))

        tok = torch.randint(4, 20, (8,), generator=g)

        def decode_step():
            dec = CachedDecoder(model.eval(), cfg.model.hybrid_override_pattern, cfg.model.norm_epsilon)
            with cpu.native():  # as greedy_ids runs it
                dec.step(tok)  # warm the state
                t = time.perf_counter()
                for _ in range(16):
                    dec.step(tok)
                dt = (time.perf_counter() - t) / 16
            model.train()
            return dt, 0.0

        shipped = cpu.native
        variants = {"native": shipped, "remap": contextlib.nullcontext}
        times = {(job, v): [] for job in ("train_step", "decode_step") for v in variants}
        losses = {v: set() for v in variants}
        for r in range(args.rounds + 2):  # two warm-up rounds
            for v, ctx in variants.items():
                cpu.native = ctx  # what run_schedule, backward_step and greedy_ids enter
                for job, fn in (("train_step", train_step), ("decode_step", decode_step)):
                    dt, loss = fn()
                    if r >= 2:
                        times[(job, v)].append(dt)
                        if job == "train_step":
                            losses[v].add(loss)
        cpu.native = shipped
        out = {}
        for job in ("train_step", "decode_step"):
            med = {v: statistics.median(times[(job, v)]) for v in variants}
            out[job] = {"native_ms": round(1e3 * med["native"], 2), "remap_ms": round(1e3 * med["remap"], 2),
                        "native_vs_remap": round(med["native"] / med["remap"], 3)}
            print(f"{job}: native {out[job]['native_ms']} ms, remap {out[job]['remap_ms']} ms, "
                  f"ratio {out[job]['native_vs_remap']}", file=sys.stderr)
        out["same_losses"] = losses["native"] == losses["remap"] and len(losses["native"]) == 1
        out["rounds"] = args.rounds
        print(json.dumps(out))
        if not out["same_losses"]:
            raise SystemExit(f"the two variants' losses differ: {losses}")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
