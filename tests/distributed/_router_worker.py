"""torchrun worker for test_router_ranks.py: routers replicated on every rank stay in lockstep.

    torchrun --standalone --nproc_per_node=2 tests/distributed/_router_worker.py OUT

Every rank builds the router from the same seed, draws 50 subnets with the same (seed, step, micro,
budget) and then trains 20 steps on the budget loss, each rank with its own micro-batch noise
(as DP ranks would), averaging grads with all_reduce_router_grads. Rank 0 writes OUT/results.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from elastic_megatron.config import load_config
from elastic_megatron.elastic.router import all_reduce_router_grads, build_router, router_optimizer

VOCAB = 64


def gathered(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(None, ["elastic.budgets=[1.0,0.75,0.5]"])
    router = build_router(cfg, VOCAB, layer_order=[0, 2, 5, 7, 1, 3, 4, 6, 8, 9], seed=123)
    opt = router_optimizer(router, cfg.router)
    n_b = len(router.targets)

    draws = [router(i % n_b, step=i, total_steps=50, seed=7, micro=i % 3).subnet.to_dict() for i in range(50)]
    all_draws = gathered(draws)
    init_equal = all(torch.equal(t, flat(router.parameters())) for t in gathered(flat(router.parameters())))

    grads_differed, steps = False, 20
    for step in range(steps):
        loss = sum(router(b, step, steps, seed=7, micro=rank).budget_loss for b in range(n_b))
        opt.zero_grad()
        loss.backward()
        mine = flat(p.grad for p in router.parameters())
        grads_differed |= not all(torch.equal(g, mine) for g in gathered(mine))
        all_reduce_router_grads(router)
        opt.step()
    params = gathered(flat(router.parameters()))
    after = [router.inference(b).to_dict() for b in range(n_b)]
    all_after = gathered(after)
    if rank == 0:
        Path(sys.argv[1], "results.json").write_text(json.dumps({
            "world": dist.get_world_size(),
            "init_params_equal": init_equal,
            "draws_equal": all(d == all_draws[0] for d in all_draws),
            "distinct_draws": len({json.dumps(d, sort_keys=True) for d in all_draws[0]}),
            "grads_differed_before_reduce": grads_differed,
            "params_equal_after_training": all(torch.equal(p, params[0]) for p in params),
            "inference_equal": all(a == all_after[0] for a in all_after),
        }))
    dist.barrier()  # leave together: a rank exiting mid-teardown can abort its gloo peer
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
