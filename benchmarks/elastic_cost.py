"""What elastic execution costs: forward+backward step time at budgets 100/75/50% vs plain megatron-core.

    python benchmarks/elastic_cost.py              # full run (~2 min on 2 idle CPU cores; more under load)
    python benchmarks/elastic_cost.py --quick      # smoke test (a few rounds, small shapes)
    python benchmarks/elastic_cost.py --breakdown  # medium only, + standalone sliced 50% model and a profile
    python benchmarks/elastic_cost.py --no-ddp     # skip the second (megatron DDP) pass

For two CPU models in one process (world 1, gloo, fp32) -- the tiny default parent and a medium
(50-100M parameter) parent -- this times one training step (forward with labels, loss.mean(),
backward) of four variants:

    plain        megatron-core's own MambaModel forward: model(tokens, position_ids, None, labels=labels)
    elastic_100  ElasticHybrid(model, cfg, layout)(tokens, position_ids, labels, subnet=Subnet.full)
    elastic_75   the same under a homogeneous subnet with ~75% of the parent's parameters
    elastic_50   ... ~50%

The subnets are the library's homogeneous baseline at that parameter target
(`elastic.subnet.homogeneous_for_target`, the same as ablation (d)): one width per axis for every
layer, every layer and the full Mamba head dim kept, the most balanced within 1% of the target;
`subnet_params` gives the achieved fraction, which is printed. The machine is noisy, so after warm-up the variants run round-robin
(plain, e100, e75, e50, plain, ...) for --rounds rounds and each variant reports its median.
Gradients are set to None between steps (outside the timed region). Logs go to stderr; the last
line on stdout is one JSON object (see docs/performance.md for the keys and a recorded run). If any
variant's p75/p25 exceeds 1.5, other jobs disturbed the run: a warning goes to stderr and the JSON
says "noisy": true.

A second pass (unless --no-ddp) times the same variants the way the training loops run them: the
model wrapped in megatron's DDP (train/optim.py `wrap_ddp`), so gradients go to persistent fp32
`main_grad` buffers, zeroed by `zero_grad_buffer()` before each step (outside the timed region,
reported separately). Its ratios are the `ddp_*` keys (`tiny_ddp_*`), details under "ddp".

Headline keys (issue 9): the medium model's DDP pass -- `ratio_50_vs_100`, `ratio_75_vs_100`,
`ratio_elastic_vs_plain` and `ratio_50_vs_sliced_50`, the elastic 50% step over the step of a
standalone model built at the 50% widths (`sliced_50`, megatron's own forward; goal <= 1.05). The
bare pass is kept as the secondary `bare_ratio_*` keys.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

from elastic_megatron.config import load_config
from elastic_megatron.elastic.model import ElasticHybrid
from elastic_megatron.elastic.slicing import sliced_model_config
from elastic_megatron.elastic.subnet import Subnet, homogeneous_for_target, subnet_params
from elastic_megatron.model.hybrid import build_model, count_parameters
from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

VOCAB = 64
VARIANTS = ("plain", "elastic_100", "elastic_75", "elastic_50")
BUDGETS = {"elastic_75": 0.75, "elastic_50": 0.5}
NOISY_SPREAD = 1.5  # p75/p25 above this for any variant: the run was disturbed

# The medium parent: 12 layers, d_inner = 2 x hidden, GQA 12 heads / 4 KV groups.
MEDIUM = [
    "model.hybrid_override_pattern=M-M*-M-M*-M-",
    "model.hidden_size=768",
    "model.ffn_hidden_size=4096",
    "model.mamba_num_heads=24",
    "model.mamba_head_dim=64",
    "model.mamba_num_groups=4",
    "model.num_attention_heads=12",
    "model.num_query_groups=4",
    "model.kv_channels=64",
]
# (batch, seq) per model; --quick shrinks them.
SHAPES = {"tiny": (8, 128), "medium": (2, 128)}
QUICK_SHAPES = {"tiny": (2, 64), "medium": (1, 64)}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def op_category(name: str) -> str:
    """Coarse class of a profiled aten op, for --breakdown."""
    n = name.replace("aten::", "")
    if n in ("mm", "addmm", "addmm_", "bmm", "baddbmm"):
        return "matmul"
    if n in ("index_select", "index_add_", "index", "index_put_"):
        return "index_select/add"
    if n in ("copy_", "fill_", "zero_", "zeros", "empty", "clone", "cat", "flip", "stack", "constant_pad_nd"):
        return "copy/fill"
    if "convolution" in n:
        return "conv1d"
    return "elementwise/reduce/other"


def time_variants(name: str, step, variants: list[str], rounds: int, warmup: int, tag: str = "") -> dict:
    """`warmup` untimed rounds, then `rounds` round-robin rounds of step(variant) -> (wall s, CPU s)."""
    t_time = time.perf_counter()
    for _ in range(warmup):
        for v in variants:
            step(v)
    times = {v: [] for v in variants}  # wall seconds
    cpu = {v: [] for v in variants}  # process CPU seconds (all threads)
    gc.collect()
    for r in range(rounds):
        for v in variants:
            wall, c = step(v)
            times[v].append(wall)
            cpu[v].append(c)
        if (r + 1) % max(1, rounds // 4) == 0:
            log(f"[{name}]{tag}   round {r + 1}/{rounds}: " + "  ".join(f"{v} {statistics.median(t) * 1e3:.1f}"
                                                                  for v, t in times.items()))
    log(f"[{name}]{tag}   timed {warmup} + {rounds} rounds in {time.perf_counter() - t_time:.1f} s")
    return {
        "times": times,
        "med": {v: statistics.median(t) * 1e3 for v, t in times.items()},
        "mins": {v: min(t) * 1e3 for v, t in times.items()},
        # Within-round ratios: the variants of one round run back to back, so slow periods of other
        # jobs on the machine hit numerator and denominator alike more often than across rounds.
        "paired": lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b])),
        "cpu_med": {v: statistics.median(t) * 1e3 for v, t in cpu.items()},
        "q": {v: statistics.quantiles(t, n=4, method="inclusive") if len(t) >= 2 else [t[0]] * 3
              for v, t in times.items()},
    }


def ratio_set(st: dict) -> dict:
    """The three ratios from each estimator of a time_variants result (median first)."""
    def three(d):
        return {"ratio_50_vs_100": d["elastic_50"] / d["elastic_100"],
                "ratio_75_vs_100": d["elastic_75"] / d["elastic_100"],
                "ratio_elastic_vs_plain": d["elastic_100"] / d["plain"]}
    p = st["paired"]
    return {"median": three(st["med"]), "min": three(st["mins"]), "cpu": three(st["cpu_med"]),
            "paired": {"ratio_50_vs_100": p("elastic_50", "elastic_100"),
                       "ratio_75_vs_100": p("elastic_75", "elastic_100"),
                       "ratio_elastic_vs_plain": p("elastic_100", "plain")}}


def timed_step(variant: str, model, sliced, elastic, subnets: dict, batch) -> tuple[float, float]:
    """One forward (with labels) + `loss.mean().backward()` of a variant: (wall s, process CPU s)."""
    tokens, pos, labels = batch
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "plain":
        loss = model(tokens, pos, None, labels=labels)  # megatron-core's own forward, [b, s]
    elif variant == "sliced_50":
        loss = sliced(tokens, pos, None, labels=labels)
    else:
        loss = elastic(tokens, pos, labels, subnet=subnets[variant])
    loss.mean().backward()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_ddp(name: str, model, sliced, layout, elastic, subnets: dict, batch, rounds: int, warmup: int) -> dict:
    """The same variants as training runs them: the model wrapped in megatron's DDP (`wrap_ddp` of
    train/optim.py, as train/loop.py and train/elastic_loop.py do), so every parameter has a
    persistent fp32 `main_grad` buffer. `plain` calls the DDP wrapper (its hooks add each `.grad`
    into `main_grad`); the elastic variants run `ElasticHybrid` over the wrapped module, as
    elastic_loop.py does, and their sliced weights accumulate straight into `main_grad`. Per step,
    `zero_grad_buffer()` (a memset of all main_grad buffers, the same for every variant) runs before
    the timed region, as `zero_grad(set_to_none=True)` does in the bare pass; its median time is
    reported, and the `with_zero_grad_buffer` estimator gives the ratios of the medians of
    zero_grad_buffer + step. Runs after the bare pass, on the same model."""
    from elastic_megatron.train.optim import wrap_ddp

    ddp_model = wrap_ddp(model, layout)
    ddp_sliced = wrap_ddp(sliced, layout) if sliced is not None else None
    variants = list(VARIANTS) + (["sliced_50"] if sliced is not None else [])
    zero_s: dict[str, list[float]] = {v: [] for v in variants}

    def step(variant: str) -> tuple[float, float]:
        t = time.perf_counter()
        ddp_model.zero_grad_buffer()
        if ddp_sliced is not None:
            ddp_sliced.zero_grad_buffer()
        zero_s[variant].append(time.perf_counter() - t)
        return timed_step(variant, ddp_model, ddp_sliced, elastic, subnets, batch)

    st = time_variants(name, step, variants, rounds, warmup, tag=" ddp")
    ratios = ratio_set(st)
    spread = max(hi / lo for lo, _, hi in st["q"].values())
    # zero_grad_buffer + step, per timed round (the last `rounds` zeroings of each variant)
    with_zero = {v: statistics.median(z + w for z, w in zip(zero_s[v][-rounds:], st["times"][v])) * 1e3
                 for v in variants}
    return {
        "ratios": ratios["median"],
        "alt_ratios": {k: ratios[k] for k in ("min", "paired", "cpu")}
        | {"with_zero_grad_buffer": ratio_set({**st, "med": with_zero})["median"]},
        "median_ms": st["med"],
        "cpu_median_ms": st["cpu_med"],
        "min_ms": st["mins"],
        "iqr_ms": {v: [round(x[0] * 1e3, 2), round(x[2] * 1e3, 2)] for v, x in st["q"].items()},
        "spread": spread,
        "zero_grad_buffer_ms": statistics.median(z for v in variants for z in zero_s[v][-rounds:]) * 1e3,
    }


def bench_model(name: str, overrides: list[str], rounds: int, warmup: int, quick: bool,
                breakdown: bool = False, ddp: bool = True, reference: bool = False) -> dict:
    t_build = time.perf_counter()
    cfg = load_config(None, overrides)
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    m = cfg.model
    params = count_parameters(m, VOCAB)
    torch.manual_seed(0)
    model = build_model(cfg, layout, VOCAB, torch.float32).train()
    assert sum(p.numel() for p in model.parameters()) == params
    elastic = ElasticHybrid(model, cfg, layout)

    b, s = (QUICK_SHAPES if quick else SHAPES)[name]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    pos = torch.arange(s).expand(b, s)

    subnets = {"elastic_100": Subnet.full(m)}
    subnets.update({v: homogeneous_for_target(m, VOCAB, f * params) for v, f in BUDGETS.items()})
    fractions = {v: subnet_params(sn, m, VOCAB) / params for v, sn in subnets.items()}
    fractions["plain"] = 1.0
    log(f"[{name}] params {params:,}  batch {b} x seq {s}  threads {torch.get_num_threads()}  "
        f"(built in {time.perf_counter() - t_build:.1f} s)")
    for v, sn in subnets.items():
        log(f"[{name}]   {v}: {fractions[v]:.3f} of params  hidden {sn.hidden}  mamba heads {sn.mamba_heads[0]}"
            f"  attn heads {sn.attn_heads[0]}  ffn {sn.ffn[0]}")

    variants = list(VARIANTS)
    sliced = None
    if breakdown or reference:
        # Reference: the standalone 50% model (megatron's own forward on a model built at the sliced
        # widths), i.e. what a 50% step costs without elastic execution. Random weights: timing only.
        small_cfg = replace(cfg, model=sliced_model_config(m, subnets["elastic_50"]))
        sliced = build_model(small_cfg, ParallelLayout.resolve(small_cfg, 1), VOCAB, torch.float32).train()
        variants.append("sliced_50")

    def step(variant: str) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        if sliced is not None:
            sliced.zero_grad(set_to_none=True)
        return timed_step(variant, model, sliced, elastic, subnets, (tokens, pos, labels))

    st = time_variants(name, step, variants, rounds, warmup)
    model.zero_grad(set_to_none=True)
    med, mins, cpu_med, q, paired = st["med"], st["mins"], st["cpu_med"], st["q"], st["paired"]
    profile = {}
    if breakdown:
        from torch.profiler import profile as torch_profile

        for v in ("plain", "elastic_100", "elastic_50", "sliced_50"):
            best = None
            for _ in range(5):  # the least disturbed of five profiled steps
                with torch_profile() as prof:
                    step(v)
                cats: dict[str, float] = {}
                for e in prof.key_averages():
                    cats[op_category(e.key)] = cats.get(op_category(e.key), 0.0) + e.self_cpu_time_total / 1e3
                if best is None or sum(cats.values()) < sum(best.values()):
                    best = cats
            profile[v] = {k: round(x, 1) for k, x in sorted(best.items())} | {"total": round(sum(best.values()), 1)}
            log(f"[{name}]   profile {v} (self CPU ms): {profile[v]}")
    model.zero_grad(set_to_none=True)
    gc.collect()
    ddp_res = None
    if ddp:
        ddp_res = bench_ddp(name, model, sliced, layout, elastic, subnets, (tokens, pos, labels), rounds, warmup)
    return {
        "ddp": ddp_res,
        "profile_ms": profile,
        "params": params,
        "batch": b,
        "seq": s,
        "median_ms": med,
        "cpu_median_ms": cpu_med,
        "iqr_ms": {v: [round(q[v][0] * 1e3, 2), round(q[v][2] * 1e3, 2)] for v in variants},
        "min_ms": {v: round(x, 2) for v, x in mins.items()},
        "alt_ratios": {
            "min": {"ratio_50_vs_100": mins["elastic_50"] / mins["elastic_100"],
                    "ratio_75_vs_100": mins["elastic_75"] / mins["elastic_100"],
                    "ratio_elastic_vs_plain": mins["elastic_100"] / mins["plain"]},
            "paired": {"ratio_50_vs_100": paired("elastic_50", "elastic_100"),
                       "ratio_75_vs_100": paired("elastic_75", "elastic_100"),
                       "ratio_elastic_vs_plain": paired("elastic_100", "plain")},
            "cpu": {"ratio_50_vs_100": cpu_med["elastic_50"] / cpu_med["elastic_100"],
                    "ratio_75_vs_100": cpu_med["elastic_75"] / cpu_med["elastic_100"],
                    "ratio_elastic_vs_plain": cpu_med["elastic_100"] / cpu_med["plain"]},
        },
        "fraction": fractions,
        "subnets": {v: {"hidden": sn.hidden, "mamba_heads": sn.mamba_heads[0], "attn_heads": sn.attn_heads[0],
                        "ffn": sn.ffn[0], "layers": sum(sn.keep)} for v, sn in subnets.items()},
        "ratio_50_vs_100": med["elastic_50"] / med["elastic_100"],
        "ratio_75_vs_100": med["elastic_75"] / med["elastic_100"],
        "ratio_elastic_vs_plain": med["elastic_100"] / med["plain"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="timed round-robin rounds (default 25 tiny / 20 medium)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 rounds, 1 warm-up, small shapes")
    ap.add_argument("--breakdown", action="store_true",
                    help="medium model only: also time the standalone sliced 50%% model (megatron forward) and "
                         "profile plain / elastic_100 / elastic_50 / sliced_50 by op class")
    ap.add_argument("--no-ddp", dest="ddp", action="store_false",
                    help="skip the second pass that times the variants with the model wrapped in megatron DDP "
                         "(main_grad buffers, as the training loops run it; the ddp_* keys)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = args.rounds or 3, min(args.warmup, 1)
    rounds = {"tiny": args.rounds or 25, "medium": args.rounds or 20}

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    res = {}
    try:
        if not args.breakdown:
            res["tiny"] = bench_model("tiny", [], rounds["tiny"], args.warmup, args.quick, ddp=args.ddp)
        res["medium"] = bench_model("medium", MEDIUM, rounds["medium"], args.warmup, args.quick, args.breakdown,
                                    ddp=args.ddp, reference=True)
    finally:
        destroy_distributed()
    md = res["medium"]
    r3 = lambda x: round(x, 3)  # noqa: E731
    # Headline: the medium model's step as training runs it (megatron DDP, main_grad buffers), and
    # the elastic 50% step against a model *built* at the 50% widths (the floor elastic execution
    # can reach). Without the DDP pass (--no-ddp) the bare pass stands in and "headline_pass" says so.
    head = md["ddp"] if md["ddp"] is not None else md
    hm = head["median_ms"]
    out = {
        "ratio_50_vs_100": r3(hm["elastic_50"] / hm["elastic_100"]),
        "ratio_75_vs_100": r3(hm["elastic_75"] / hm["elastic_100"]),
        "ratio_elastic_vs_plain": r3(hm["elastic_100"] / hm["plain"]),
        "ratio_50_vs_sliced_50": r3(hm["elastic_50"] / hm["sliced_50"]),
        "headline_pass": "ddp" if md["ddp"] is not None else "bare",
        # the bare pass (model unwrapped, .grad set to None each step): secondary
        "bare_ratio_50_vs_100": r3(md["ratio_50_vs_100"]),
        "bare_ratio_75_vs_100": r3(md["ratio_75_vs_100"]),
        "bare_ratio_elastic_vs_plain": r3(md["ratio_elastic_vs_plain"]),
        "bare_ratio_50_vs_sliced_50": r3(md["median_ms"]["elastic_50"] / md["median_ms"]["sliced_50"]),
    }
    if "tiny" in res:
        out.update({f"tiny_{k}": r3(res["tiny"][k]) for k in ("ratio_50_vs_100", "ratio_75_vs_100",
                                                             "ratio_elastic_vs_plain")})
        out["tiny_params"] = res["tiny"]["params"]
    out.update({
        "medium_params": md["params"],
        "timings_ms": {k: {v: round(x, 2) for v, x in r["median_ms"].items()} for k, r in res.items()},
        "iqr_ms": {k: r["iqr_ms"] for k, r in res.items()},  # [p25, p75] of the wall times
        "min_ms": {k: r["min_ms"] for k, r in res.items()},  # fastest round: least disturbed by other jobs
        # Process CPU time per step (both threads): less sensitive to other jobs on the machine.
        "cpu_ms": {k: {v: round(x, 2) for v, x in r["cpu_median_ms"].items()} for k, r in res.items()},
        # The same ratios from other estimators (robustness check on a shared, noisy machine):
        # min = fastest round per variant, paired = median of within-round ratios, cpu = CPU-time medians.
        "alt_ratios": {k: {est: {name: r3(x) for name, x in d.items()} for est, d in r["alt_ratios"].items()}
                       for k, r in res.items()},
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],  # start, end
        # Largest p75/p25 of the wall times over the variants: near 1 on a quiet machine.
        "spread": {k: r3(max(hi / lo for lo, hi in r["iqr_ms"].values())) for k, r in res.items()},
        "fractions": {k: {v: r3(x) for v, x in r["fraction"].items()} for k, r in res.items()},
        "subnets": {k: r["subnets"] for k, r in res.items()},
        "shapes": {k: {"batch": r["batch"], "seq": r["seq"]} for k, r in res.items()},
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "quick": bool(args.quick),
        "targets_met": {"ratio_50_vs_100<=0.60": out["ratio_50_vs_100"] <= 0.60,
                        "ratio_elastic_vs_plain<=1.05": out["ratio_elastic_vs_plain"] <= 1.05,
                        "ratio_50_vs_sliced_50<=1.05": out["ratio_50_vs_sliced_50"] <= 1.05},
        "wall_s": round(time.perf_counter() - t0, 1),
    })
    if args.breakdown:
        mm = md["median_ms"]
        out["breakdown"] = {"sliced_50_vs_elastic_100": r3(mm["sliced_50"] / mm["elastic_100"]),
                            "elastic_50_vs_sliced_50": r3(mm["elastic_50"] / mm["sliced_50"]),
                            "profile_self_cpu_ms": md["profile_ms"]}
    if all(r["ddp"] is not None for r in res.values()):
        # Second pass: the training step as the training loops run it (megatron DDP, main_grad
        # buffers). Same variants, rounds and estimators; keys prefixed ddp_ (tiny: tiny_ddp_).
        for k, r in res.items():
            pre = "ddp_" if k == "medium" else f"{k}_ddp_"
            out.update({pre + n: r3(x) for n, x in r["ddp"]["ratios"].items()})
        out["ddp"] = {
            "timings_ms": {k: {v: round(x, 2) for v, x in r["ddp"]["median_ms"].items()} for k, r in res.items()},
            "iqr_ms": {k: r["ddp"]["iqr_ms"] for k, r in res.items()},
            "min_ms": {k: {v: round(x, 2) for v, x in r["ddp"]["min_ms"].items()} for k, r in res.items()},
            "cpu_ms": {k: {v: round(x, 2) for v, x in r["ddp"]["cpu_median_ms"].items()} for k, r in res.items()},
            "alt_ratios": {k: {est: {n: r3(x) for n, x in d.items()} for est, d in r["ddp"]["alt_ratios"].items()}
                           for k, r in res.items()},
            "spread": {k: r3(r["ddp"]["spread"]) for k, r in res.items()},
            "zero_grad_buffer_ms": {k: round(r["ddp"]["zero_grad_buffer_ms"], 2) for k, r in res.items()},
        }
        if args.breakdown:
            mm = md["ddp"]["median_ms"]
            out["breakdown"]["ddp_sliced_50_vs_elastic_100"] = r3(mm["sliced_50"] / mm["elastic_100"])
            out["breakdown"]["ddp_elastic_50_vs_sliced_50"] = r3(mm["elastic_50"] / mm["sliced_50"])
        ddp_noisy = [k for k, x in out["ddp"]["spread"].items() if x > NOISY_SPREAD]
        if ddp_noisy:
            log(f"WARNING: ddp pass: {', '.join(ddp_noisy)} timings are spread out (p75/p25 > {NOISY_SPREAD})")
        out["ddp"]["noisy"] = bool(ddp_noisy)
        out["wall_s"] = round(time.perf_counter() - t0, 1)
    noisy = [k for k, x in out["spread"].items() if x > NOISY_SPREAD]
    if noisy:
        log(f"WARNING: {', '.join(noisy)} timings are spread out (p75/p25 > {NOISY_SPREAD}): other jobs were "
            "using the CPUs; the medians are unreliable, compare alt_ratios.min or rerun on an idle machine")
    out["noisy"] = bool(noisy)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
