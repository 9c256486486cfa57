"""train.recompute=full: the same losses and gradients as none, and far fewer saved activations.

Saved activations are measured exactly: every tensor autograd keeps for the backward passes
through a saved-tensors hook during the forward, which sums their bytes (the parameters are
excluded: they are kept anyway). Peak process memory on a larger model is in
benchmarks/recompute_memory.py and docs/performance.md.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from elastic_megatron.config import load_config

VOCAB = 64


@pytest.fixture(scope="module")
def env():
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 90))
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

    cfg = load_config(None, [])
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    model = build_model(cfg, layout, VOCAB, torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 64), generator=g)
    labels = torch.randint(0, VOCAB, (2, 64), generator=g)
    yield cfg, layout, model, tokens, torch.arange(64).expand(2, 64), labels
    destroy_distributed()


def saved_bytes_and_grads(run, params):
    """(loss, bytes of non-parameter tensors saved for backward during run(), the gradients).

    The gradients come from a second run without the measuring hook: an outer saved-tensors hook
    changes what activation recomputation hands back to a backward (the tensors themselves instead
    of detached aliases), and hid a lost-gradient bug once."""
    ids = {p.data_ptr() for p in params}
    total = [0]

    def pack(t):
        if t.data_ptr() not in ids:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    for p in params:
        p.grad = None
    loss = run()
    loss.backward()
    return float(loss), total[0], [None if p.grad is None else p.grad.clone() for p in params]


def elastic_run(env, recompute: str, mode: str):
    from elastic_megatron.elastic.model import ElasticHybrid, SoftMasks
    from elastic_megatron.elastic.router import build_router

    cfg, layout, model, tokens, pos, labels = env
    cfg = replace(cfg, train=replace(cfg.train, recompute=recompute))
    router = build_router(cfg, VOCAB)
    params = list(model.parameters()) + list(router.parameters())

    def run():
        # frozen: a curriculum stage with the router frozen runs a deployed subnet sliced, gates constant
        with torch.set_grad_enabled(mode != "frozen"):
            dec = router(1, step=0, total_steps=2, seed=5, hard=mode != "soft")
        masks = None
        if mode == "soft":
            masks = SoftMasks.of(router.soft_masks(dec))
        view = ElasticHybrid(model, cfg, layout)
        return view(tokens, pos, labels, subnet=None if mode == "soft" else dec.subnet, gates=dec.layer_gates,
                    masks=masks).mean()

    return saved_bytes_and_grads(run, params)


@pytest.mark.parametrize("mode", ["hard", "soft", "frozen"])
def test_elastic_recompute_same_numbers_fewer_saved_activations(env, mode):
    loss0, bytes0, g0 = elastic_run(env, "none", mode)
    loss1, bytes1, g1 = elastic_run(env, "full", mode)
    assert loss1 == loss0
    assert sum(g is not None for g in g0) > 0 and [g is None for g in g0] == [g is None for g in g1]
    for a, b in zip(g0, g1):
        if a is not None:  # the recomputed forward is the same computation: same gradients
            assert torch.allclose(a, b, rtol=0, atol=1e-7 * max(1.0, float(a.abs().max()))), float((a - b).abs().max())
    assert bytes1 < bytes0 / 4, (bytes0, bytes1)  # each layer keeps only its input [s, b, h]
    print(f"\n{mode}: saved activations {bytes0 / 2**20:.2f} MiB -> {bytes1 / 2**20:.2f} MiB")


def test_parent_recompute_same_numbers_fewer_saved_activations(env):
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.model.recompute import recompute_megatron_layers

    cfg, layout, _, tokens, pos, labels = env
    results = []
    for mode in ("none", "full"):
        model = build_model(cfg, layout, VOCAB, torch.float32)
        recompute_megatron_layers(model, mode)
        results.append(saved_bytes_and_grads(lambda m=model: m(tokens, pos, None, labels=labels).mean(),
                                             list(model.parameters())))
    (l0, b0, g0), (l1, b1, g1) = results
    assert l0 == l1 and all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(g0, g1) if a is not None)
    assert b1 < b0 / 4, (b0, b1)


def test_recompute_is_validated():
    from elastic_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="train.recompute"):
        load_config(None, ["train.recompute=selective"])
    with pytest.raises(ConfigError, match="curriculum.1.recompute"):
        load_config(None, ["curriculum.1.recompute=selective"])
