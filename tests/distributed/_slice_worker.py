"""torchrun worker: parent forward under a subnet vs the sliced standalone model (megatron's own forward).

Usage: torchrun --nproc_per_node=N tests/distributed/_slice_worker.py OUT.json [overrides...]
Writes {"tp": N, "results": [{"subnet": ..., "max_abs_diff": ..., "params": ...}, ...]} on rank 0.
"""

import json
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from elastic_megatron.config import load_config
from elastic_megatron.elastic.model import ElasticHybrid
from elastic_megatron.elastic.slicing import gather_full_state, load_full_state, slice_state, sliced_model_config
from elastic_megatron.elastic.subnet import Subnet, check_subnet, subnet_params
from elastic_megatron.model.hybrid import build_model, count_parameters
from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

T, F = True, False
# Three budgets of the tiny parent (pattern M-M*-M-M*-): heterogeneous FFN and Mamba widths, dropped layers.
SUBNETS = [
    Subnet(168, (16, 12, 8, 16), (24, 18, 24, 12), (8, 4), (576, 768, 384, 192), (T, T, T, T, T, T, T, F, T, T)),
    Subnet(144, (12, 8, 12, 8), (18, 24, 12, 18), (4, 8), (384, 192, 576, 384), (T, F, T, T, T, T, F, T, T, F)),
    Subnet(96, (8, 8, 4, 8), (12, 12, 12, 6), (4, 4), (192, 192, 192, 192), (T, T, F, T, F, T, T, F, T, F)),
]


def _full_grads(model, cfg, layout) -> dict:
    """Every parameter's gradient as a full (TP=1) tensor, by global name."""
    from megatron.core import parallel_state as ps

    from elastic_megatron.model import sharding

    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if layout.tensor > 1 and sharding.split_rule(name) is not None:
            pieces = [torch.empty_like(g) for _ in range(layout.tensor)]
            dist.all_gather(pieces, g.contiguous(), group=ps.get_tensor_model_parallel_group())
            g = sharding.unshard(name, pieces, cfg.model)
        out[name] = g.clone()
    return out


def main(out_path: str, overrides: list[str]) -> None:
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, [f"parallel.tensor={world}", *overrides])
    layout = ParallelLayout.resolve(cfg, world)
    init_distributed(layout, cfg.train.seed)
    vocab = 64
    parent = build_model(cfg, layout, vocab, torch.float32).eval()
    full = gather_full_state(parent, cfg, layout)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 48), generator=g)
    pos = torch.arange(48).expand(2, 48)
    results = []
    for s in SUBNETS:
        check_subnet(s, cfg.model, layout.tensor)
        with torch.no_grad():
            want = ElasticHybrid(parent, cfg, layout)(tokens, pos, subnet=s)
        small_cfg = replace(cfg, model=sliced_model_config(cfg.model, s))
        small = build_model(small_cfg, ParallelLayout.resolve(small_cfg, world), vocab, torch.float32).eval()
        load_full_state(small, slice_state(full, cfg.model, s, sort_tp=layout.tensor), small_cfg, layout)
        with torch.no_grad():
            got = small(tokens, pos, None)  # megatron's own MambaModel forward
        # Training sees the same function: gradients of the kept weights equal the sliced model's.
        labels = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(1))
        parent.zero_grad(set_to_none=True)
        small.zero_grad(set_to_none=True)
        ElasticHybrid(parent, cfg, layout)(tokens, pos, labels, subnet=s).mean().backward()
        small(tokens, pos, None, labels=labels).mean().backward()
        want_g = slice_state(_full_grads(parent, cfg, layout), cfg.model, s, sort_tp=layout.tensor)
        got_g = _full_grads(small, small_cfg, layout)
        grad_diff = max((want_g[k] - got_g[k]).abs().max().item() for k in got_g)
        grad_scale = max(got_g[k].abs().max().item() for k in got_g)
        results.append({
            "subnet": s.to_dict(),
            "grad_max_abs_diff": grad_diff,
            "grad_max_abs": grad_scale,
            "grad_tensors": len(got_g),
            "max_abs_diff": (want - got).abs().max().item(),
            "max_abs_logit": want.abs().max().item(),
            "params_closed_form": subnet_params(s, cfg.model, vocab),
            "params_sliced_config": count_parameters(small_cfg.model, vocab),
            "params_sliced_model_local": sum(p.numel() for p in small.parameters()),
            "pattern": small_cfg.model.hybrid_override_pattern,
        })
    if dist.get_rank() == 0:
        json.dump({"tp": layout.tensor, "results": results}, open(out_path, "w"), indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
