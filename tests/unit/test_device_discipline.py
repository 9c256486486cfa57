"""Every tensor of an elastic training step on the model's device, checked without a GPU.

The model, the router and the batch go to PyTorch's `meta` device (shapes and dtypes propagate, no
data): any tensor that an elastic step makes on the CPU instead of the model's device -- a mask, an
index, a loss term, Gumbel noise, a gate -- meets a meta tensor somewhere and raises, exactly where
it would meet a CUDA tensor and raise on a GPU. The step is the training loop's own
(`_forward_step` and its loss, hard and soft mode, a fixed full-size budget, intermediate-layer
distillation), then backward and the router's Adam step.

What meta cannot run is the one value the host must read: the router's argmax, which sets the
subnet's integer sizes (one read per decision, before the forward, never inside the layer loop).
The test takes that subnet from a CPU twin of the router; everything else runs on meta.
"""

from __future__ import annotations

import os

import pytest
import torch

from elastic_megatron.config import load_config

VOCAB = 64


@pytest.fixture(scope="module")
def env():
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 90))
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

    cfg = load_config(None, ["distill.intermediate_layers=[3,7]", "distill.intermediate_weight=0.5"])
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    student = build_model(cfg, layout, VOCAB, torch.float32).to("meta")
    teacher = build_model(cfg, layout, VOCAB, torch.float32).to("meta")
    yield cfg, layout, student, teacher
    destroy_distributed()


@pytest.fixture
def router(env):
    """The router on meta, its argmax -> subnet answered by a CPU twin (the one host read)."""
    from elastic_megatron.elastic.router import build_router

    cfg = env[0]
    twin = build_router(cfg, VOCAB)
    choices = {}
    r = build_router(cfg, VOCAB).to("meta")
    r.to_subnet = lambda idx: choices["subnet"]
    return r, twin, choices


def batch(b: int = 2, s: int = 16) -> dict:
    meta = torch.device("meta")
    return {"tokens": torch.zeros(b, s, dtype=torch.long, device=meta),
            "position_ids": torch.arange(s, device=meta).expand(b, s),
            "labels": torch.zeros(b, s, dtype=torch.long, device=meta),
            "loss_mask": torch.ones(b, s, device=meta)}


def one_step(env, router, mode: str, budget: int, full: bool = False) -> torch.Tensor:
    from dataclasses import replace

    from elastic_megatron.elastic.model import ElasticHybrid
    from elastic_megatron.elastic.subnet import Subnet
    from elastic_megatron.train.elastic_loop import _forward_step, fixed_decision

    cfg, layout, student, teacher = env
    r, twin, choices = router
    cfg = replace(cfg, elastic=replace(cfg.elastic, mode=mode))
    choices["subnet"] = Subnet.full(cfg.model) if full else twin.inference(budget)
    dec = r(budget, step=1, total_steps=4, seed=3, hard=mode == "hard", micro=0)
    if full:
        dec = fixed_decision(dec, choices["subnet"], twin.cost_of(choices["subnet"]))
    out, loss_fn = _forward_step(ElasticHybrid(student, cfg, layout), ElasticHybrid(teacher, cfg, layout), [dec], r,
                                 cfg, iter([batch()]), None)
    total, stats = loss_fn(out)
    assert total.device.type == "meta" and stats["stats"].device.type == "meta"
    student.zero_grad(set_to_none=True)
    r.zero_grad(set_to_none=True)
    total.backward()
    return total


@pytest.mark.parametrize("mode, budget, full", [("hard", 1, False), ("hard", 0, True), ("soft", 2, False)])
def test_elastic_step_keeps_every_tensor_on_the_model_device(env, router, mode, budget, full):
    from elastic_megatron.elastic.router import router_optimizer

    r = router[0]
    one_step(env, router, mode, budget, full)
    grads = [p.grad for p in r.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "meta" for g in grads)  # the router learned from this step
    assert all(p.grad is None or p.grad.device.type == "meta" for p in env[2].parameters())
    opt = router_optimizer(r, env[0].router)
    opt.step()  # Adam state is created where the router lives
    assert all(t.device.type == "meta" for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
               and t.dim() > 0)


def test_a_stray_host_tensor_is_caught(env, router):
    """The net has holes only if meta let CPU tensors through: show it does not."""
    r, twin, choices = router
    choices["subnet"] = twin.inference(1)
    dec = r(1, step=1, total_steps=4, seed=3)
    with pytest.raises(RuntimeError, match="device"):
        torch.stack([dec.budget_loss, torch.tensor(0.0)])  # e.g. a loss term made with torch.tensor(...)
    with pytest.raises(RuntimeError, match="device"):
        _ = dec.layer_gates * torch.ones(dec.layer_gates.shape)  # e.g. a mask made on the host
