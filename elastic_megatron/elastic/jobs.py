"""The elastic command-line jobs: `importance` (score + sort a parent) and `slice` (cut budgets out).

    elastic-megatron importance --config C checkpoint.load=runs/tiny/checkpoints/iter_0000200
        -> <out_dir>/importance.pt, <out_dir>/sorted/{config.yaml, checkpoints/}
    elastic-megatron slice --config C checkpoint.load=<sorted ckpt> --budget 0.5 --budget 2.5M --out DIR
        -> DIR/<budget>/{config.yaml, subnet.json, checkpoints/} and DIR/slices.json

Both run under torchrun like `train` (importance under any TP x PP x DP; slice in one process,
since dist checkpoints load under any layout).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RunConfig, parse_budget, to_yaml
from ..data.build import build_datasets
from ..data.tokenizer import load_tokenizer
from ..model.hybrid import build_model, count_parameters, padded_vocab_size
from ..parallel import ParallelLayout, destroy_distributed, init_distributed
from ..train.checkpoint import resolve_checkpoint, save_checkpoint
from ..train.loop import run_dtype
from .sorting import load_parent


def _parent(cfg: RunConfig, world: int):
    layout = ParallelLayout.resolve(cfg, world)
    init_distributed(layout, cfg.train.seed)
    tok = load_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(cfg.model, tok.vocab_size, layout.tensor)
    # weights about to be loaded are not drawn first
    model = build_model(cfg, layout, vocab, run_dtype(cfg.train.precision), initialize=not cfg.checkpoint.load)
    # a sorted parent comes out laid for this TP size, whatever TP size it was written under
    loop = load_parent(resolve_checkpoint(cfg.checkpoint.load), model, cfg, layout) if cfg.checkpoint.load else {}
    return layout, tok, vocab, model, loop


def importance_job(cfg: RunConfig) -> dict:
    """Estimate importance on calibration batches, save the scores, write the sorted parent."""
    from .importance import ImportanceScores, calibration_batches, estimate_importance
    from .sorting import sort_parent

    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout, tok, vocab, model, _ = _parent(cfg, world)
    try:
        out = Path(cfg.logging.out_dir)
        path = Path(cfg.elastic.importance_path or out / "importance.pt")
        if path.exists():
            scores = ImportanceScores.load(path)  # saved scores are reused
        else:
            train_ds, _ = build_datasets(cfg, tok, num_train=cfg.elastic.importance_batches * cfg.train.micro_batch_size)
            model.eval()
            scores = estimate_importance(model, calibration_batches(train_ds, cfg, layout), cfg, layout)
            if dist.get_rank() == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                scores.save(path)
        sort_parent(model, scores, cfg.model, layout)
        sorted_cfg = replace(cfg, elastic=replace(cfg.elastic, sort_tensor_parallel=layout.tensor,
                                                  importance_path=str(path)))
        sorted_dir = out / "sorted"
        if dist.get_rank() == 0:
            sorted_dir.mkdir(parents=True, exist_ok=True)
            (sorted_dir / "config.yaml").write_text(to_yaml(sorted_cfg))
        ckpt = save_checkpoint(sorted_dir / "checkpoints", 0, model, None,
                               {"step": 0, "sorted": True, "ffn_layout_tp": layout.tensor,
                                "layer_order": scores.layer_order, "config": to_yaml(sorted_cfg)})
        return {"importance": str(path), "sorted_checkpoint": str(ckpt), "layer_order": scores.layer_order,
                "config": str(sorted_dir / "config.yaml")}
    finally:
        destroy_distributed()


def fit_router(cfg: RunConfig, vocab: int, layer_order, steps: int = 600):
    """A router trained on the budget loss alone (for slicing a parent that had no router training)."""
    from .router import build_router, router_optimizer

    router = build_router(cfg, vocab, layer_order=layer_order, tp=1)
    opt = router_optimizer(router, cfg.router)
    for step in range(steps):
        for b in range(len(router.targets)):
            opt.zero_grad()
            router(b, step=step, total_steps=steps, seed=cfg.train.seed).budget_loss.backward()
            opt.step()
    return router


def family_subnets(cfg: RunConfig, router) -> list:
    """One subnet per budget of `cfg.elastic.budgets`, nested (largest first): the full model for a
    budget at or above the parent's size, the hand-picked subnet where `elastic.subnets` names one,
    else the router's deployed choice (within elastic.deploy_tolerance of its target, elastic/deploy.py)."""
    from .deploy import deployed_family

    fixed = router.fixed_subnets(cfg.elastic.subnets, 1)  # slicing runs in one process
    return deployed_family(router, fixed, cfg.elastic.deploy_tolerance)


def _layer_order(cfg: RunConfig, loop: dict):
    """The depth ranking: the one an elastic-train checkpoint records, else the saved importance scores'."""
    from .importance import ImportanceScores

    if loop.get("layer_order"):
        return list(loop["layer_order"])
    if cfg.elastic.importance_path and Path(cfg.elastic.importance_path).exists():
        return ImportanceScores.load(cfg.elastic.importance_path).layer_order
    return None


def choose_family(cfg: RunConfig, loop: dict, vocab: int, budgets: list[str], router_path: str = "") -> dict:
    """{budget text: (subnet, target)} for `budgets` (default: elastic.budgets), nested. The router
    that chooses: a saved one (`router_path`), else the one an elastic-train checkpoint holds when
    every budget asked for is one it was trained for, else one fitted on the budget loss alone.
    `slice`, `export-hf` and `generate` all take their subnets from here."""
    from .router import build_router

    trained = list(cfg.elastic.budgets)
    budgets = list(budgets) or trained
    if all(parse_budget(b) == 1.0 for b in budgets):  # the parent itself: no router (nor its choices) needed
        from ..model.hybrid import count_parameters
        from .subnet import Subnet

        return {b: (Subnet.full(cfg.model), count_parameters(cfg.model, vocab)) for b in budgets}
    order = _layer_order(cfg, loop)
    if router_path:
        use = replace(cfg, elastic=replace(cfg.elastic, budgets=budgets, subnets=[])) if budgets != trained else cfg
        router = torch.load(router_path, weights_only=False)
    elif "router" in loop and set(budgets) <= set(trained):
        use = cfg
        router = build_router(cfg, vocab, layer_order=order, tp=1)
        router.load_state_dict(loop["router"])
        if loop.get("family"):  # the family a frozen stage chose on held-out loss and trained (deploy.py)
            from .subnet import Subnet

            family = dict(zip(trained, zip([Subnet.from_dict(d) for d in loop["family"]], router.targets)))
            return {b: family[b] for b in budgets}
    else:
        router = None
        if set(budgets) <= set(trained):  # a family of fixed subnets (full / hand-picked): no router to fit
            use = cfg  # the whole family, so a budget nests the same whether asked alone or with the others
            router = build_router(cfg, vocab, layer_order=order, tp=1)
            router = router if len(router.fixed_subnets(cfg.elastic.subnets, 1)) == len(trained) else None
        if router is None:  # no trained router (or new budgets): fit one to these budgets on the budget loss
            use = replace(cfg, elastic=replace(cfg.elastic, budgets=budgets, subnets=[]))
            router = fit_router(use, vocab, order)
    family = dict(zip(use.elastic.budgets, zip(family_subnets(use, router), router.targets)))
    return {b: family[b] for b in budgets}


def _write_slices(single: RunConfig, parent, layout, vocab: int, named: dict, out_dir: str, extra: dict) -> list[dict]:
    from .slicing import gather_full_state, load_full_state, slice_state, sliced_model_config, write_standalone
    from .subnet import subnet_params

    full = gather_full_state(parent, single, layout)  # the parent was re-laid for TP=1 when loaded
    rows = []
    for text, subnet in named.items():
        # A standalone model: one budget (itself), and sorted (its FFN rows are the parent's best, in
        # rank order, laid out for TP=1), so it can parent a family of its own.
        small_cfg = replace(single, model=sliced_model_config(single.model, subnet),
                            elastic=replace(single.elastic, budgets=["1.0"], subnets=[], sort_tensor_parallel=1),
                            curriculum=[replace(st, budget_probs=[]) for st in single.curriculum])
        small = build_model(small_cfg, ParallelLayout.resolve(small_cfg, 1), vocab, torch.float32)
        load_full_state(small, slice_state(full, single.model, subnet), small_cfg, layout)
        params = count_parameters(small_cfg.model, vocab)
        assert params == subnet_params(subnet, single.model, vocab)
        path = write_standalone(Path(out_dir) / ("budget_" + text.replace(".", "p")), small_cfg, small, subnet,
                                {"budget": text, "params": params, **extra.get(text, {})})
        rows.append({"budget": text, "params": params, **extra.get(text, {}), "path": str(path),
                     "pattern": small_cfg.model.hybrid_override_pattern, "subnet": subnet.to_dict()})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "slices.json").write_text(json.dumps(rows, indent=1))
    return rows


def slice_job(cfg: RunConfig, budgets: list[str], out_dir: str, router_path: str = "") -> list[dict]:
    """Cut each budget out of the sorted parent in `checkpoint.load` into a standalone checkpoint."""
    for b in budgets:  # before the (slow) parent load
        parse_budget(b)
    single = replace(cfg, parallel=replace(cfg.parallel, tensor=1, pipeline=1, data=1))
    layout, tok, vocab, parent, loop = _parent(single, 1)
    try:
        family = choose_family(cfg, loop, vocab, budgets, router_path)
        named = {b: s for b, (s, _) in family.items()}
        extra = {b: {"target": target} for b, (_, target) in family.items()}
        return _write_slices(single, parent, layout, vocab, named, out_dir, extra)
    finally:
        destroy_distributed()


def slice_subnets(cfg: RunConfig, named: dict, out_dir: str) -> list[dict]:
    """Cut the given subnets ({name: Subnet}, not necessarily nested) out of `checkpoint.load`."""
    single = replace(cfg, parallel=replace(cfg.parallel, tensor=1, pipeline=1, data=1))
    layout, tok, vocab, parent, _ = _parent(single, 1)
    try:
        return _write_slices(single, parent, layout, vocab, named, out_dir, {})
    finally:
        destroy_distributed()


def family_from_checkpoint(cfg: RunConfig, ckpt: str) -> dict:
    """{budget: subnet} that the router saved in an elastic-train checkpoint picks (see family_subnets)."""
    single = replace(cfg, parallel=replace(cfg.parallel, tensor=1, pipeline=1, data=1),
                     checkpoint=replace(cfg.checkpoint, load=str(ckpt)))
    _, _, vocab, _, loop = _parent(single, 1)
    try:
        if "router" not in loop:
            raise ValueError(f"{ckpt} holds no router state: pass an elastic-train checkpoint")
        return {b: s for b, (s, _) in choose_family(cfg, loop, vocab, []).items()}
    finally:
        destroy_distributed()
