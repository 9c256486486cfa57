"""What serving every budget from one set of weights costs and gives, without HTTP (the engine the
server runs); the demo's serving section and benchmarks/serve_bench.py share these measurements.

- engine_memory: the engine's tensor bytes (the parent + the gathered per-channel vectors and index
  vectors) against the parent's, and against the budgets exported as separate models;
- decode_speed: tokens/s of each budget through the engine (views of the parent) against the same
  subnet cut to its own size (`generate`'s cut, inference.CachedDecoder), rounds interleaved so both
  see the same machine load;
- schedule_accuracy: the demo's long problems answered by the smallest budget, the full one, and
  think-small / answer-full (re-prefill at the switch), with exact-match accuracy and wall time.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..compat import native


def engine_memory(engine) -> dict:
    parent = sum(p.numel() * p.element_size() for p in engine.parent.parameters())
    gathered = sum(t.numel() * t.element_size() for b in engine.budgets for v in b.small.values() for t in v.values()
                   if isinstance(t, torch.Tensor))
    exported = sum(b.params for b in engine.budgets) * next(engine.parent.parameters()).element_size()
    return {"parent_bytes": parent, "gathered_bytes": gathered,
            "all_budgets_vs_parent": round((parent + gathered) / parent, 4),
            "exported_separately_bytes": exported, "exported_separately_vs_parent": round(exported / parent, 3)}


def _seconds(step, tokens: torch.Tensor) -> float:
    """Feed tokens [steps, b] to a fresh decode state; one host sync at the end (GPU: queued work done)."""
    t = time.perf_counter()
    for s in range(tokens.shape[0]):
        out = step(tokens[s])
    out.cpu()
    return time.perf_counter() - t


@torch.no_grad()
def decode_speed(cfg, batch: int = 8, steps: int = 32, rounds: int = 5) -> dict:
    """{budget: engine tok/s, exported tok/s, ratio} for every trained budget (medians of rounds), and
    the engine's memory."""
    from ..generate import cut_budget
    from ..inference import CachedDecoder
    from ..parallel import destroy_distributed
    from .engine import BudgetDecoder, Engine

    exported = {}
    for name in cfg.elastic.budgets:  # each subnet at its own size, as `generate --budget` holds it
        try:
            small, small_cfg, *_ = cut_budget(cfg, name)
            exported[name] = small, small_cfg
        finally:
            destroy_distributed()
    try:
        engine = Engine.load(cfg, list(cfg.elastic.budgets))
        by_name = {a: b for b in engine.budgets for a in b.aliases}
        tokens = torch.randint(4, 20, (steps, batch), device=engine.device)
        times = {n: ([], []) for n in exported}
        with native():  # as the engine's worker thread runs (the CPU device remap is thread-local)
            for _ in range(rounds):
                for name, (small, small_cfg) in exported.items():
                    times[name][0].append(_seconds(BudgetDecoder(engine.parent, engine.cfg, by_name[name]).step,
                                                   tokens))
                    times[name][1].append(_seconds(CachedDecoder(small, small_cfg.model.hybrid_override_pattern,
                                                                 small_cfg.model.norm_epsilon).step, tokens))
        out = {}
        for name, (eng, exp) in times.items():
            e, x = sorted(eng)[len(eng) // 2], sorted(exp)[len(exp) // 2]
            out[name] = {"model": by_name[name].id, "engine_tok_s": round(batch * steps / e, 1),
                         "exported_tok_s": round(batch * steps / x, 1), "engine_vs_exported": round(x / e, 3)}
        mem = engine_memory(engine)
        engine.close()
        return {"batch": batch, "steps": steps, "rounds": rounds, "per_budget": out, "memory": mem}
    finally:
        destroy_distributed()


def schedule_accuracy(cfg, n_long: int, seed: int, max_tokens: int = 200) -> dict:
    """Long problems: the smallest budget alone, the full one alone, think-smallest / answer-full."""
    from ..data.synthetic import extract_answer, heldout_problems
    from ..demo import LONG_STEPS, standard_error
    from ..parallel import destroy_distributed
    from .app import Server
    from .engine import Engine, Request

    try:
        engine = Engine.load(cfg, list(cfg.elastic.budgets))
        server = Server(engine)
        small, full = engine.budgets[-1].id, engine.budgets[0].id
        problems = heldout_problems(n_long, seed=seed, min_steps=LONG_STEPS[0], max_steps=LONG_STEPS[1])
        modes = {f"{small} alone": (small, None), f"{full} alone": (full, None),
                 f"think {small} / answer {full}": (small, {"think": small, "answer": full, "switch": "a:"})}
        out = {}
        for label, (model, sch) in modes.items():
            def one(p, model=model, sch=sch):
                req = Request(model, engine.tok.encode(p.prompt), max_tokens=max_tokens, temperature=0.0)
                text, _, usage = server.run(req, sch)
                return extract_answer(text) == p.answer, usage.get("budget_schedule", {})

            t = time.perf_counter()
            with ThreadPoolExecutor(max(1, len(problems))) as ex:  # all queued at once: the engine batches them
                res = list(ex.map(one, problems))
            acc = sum(ok for ok, _ in res) / max(1, len(res))
            row = {"accuracy_long": round(acc, 4), "se": round(standard_error(acc, len(res)), 4),
                   "wall_s": round(time.perf_counter() - t, 2)}
            if sch:
                row["switched"] = sum(bool(i.get("switched")) for _, i in res)
                row["mean_reprefill_tokens"] = round(sum(i.get("reprefill_tokens", 0) for _, i in res)
                                                     / max(1, len(res)), 1)
            out[label] = row
        engine.close()
        return {"n_long": n_long, "modes": out}
    finally:
        destroy_distributed()
