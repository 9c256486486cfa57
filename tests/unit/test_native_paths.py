"""The hot paths run without the CPU device remap, and only they (compat/cpu.py, `native()`).

The remap (a TorchFunctionMode that turns megatron's `cuda` tensors into CPU ones) costs a Python
call per torch op: on the demo's model about 3 % of an optimizer step and 24 % of a decode step
(benchmarks/remap_cost.py). A
micro-batch's forward and backward, decoding and the demo's evaluation leave it out; the schedule
around them, the optimizer and checkpointing keep it. Checked here: where each piece runs with
or without it, that `native()` really drops it (a `cuda` tensor then fails as on any CPU-only
torch), and that megatron's one forward-path `cuda` tensor (its softmax's causal mask) is replaced.
Numerics are unchanged: the exactness tests (TP / PP against one process, bit-identical resume)
run through the same paths.
"""

from __future__ import annotations

import os

import pytest
import torch

from elastic_megatron import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the remap is installed only without CUDA")


def _remapped() -> bool:
    from elastic_megatron.compat.cpu import CudaToCpuMode

    return any(isinstance(m, CudaToCpuMode) for m in torch.overrides._get_current_function_mode_stack())


def test_native_drops_the_remap_and_restores_it():
    compat.install()
    assert _remapped() and torch.zeros(1, device="cuda").device.type == "cpu"
    with compat.native():
        assert not _remapped()
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")  # what megatron's cuda calls meet inside the hot paths
    assert _remapped() and torch.ones(1).cuda().device.type == "cpu"


def test_causal_mask_is_megatrons_on_the_cpu():
    compat.install()
    from megatron.core.fusions import fused_softmax

    with compat.native():
        mask = fused_softmax.get_default_causal_mask(5)
    assert mask.dtype == torch.bool and mask.device.type == "cpu"
    assert torch.equal(mask, torch.ones(5, 5).triu(1).bool())


@pytest.fixture(scope="module")
def parent():
    os.environ.setdefault("MASTER_PORT", str(29950 + os.getpid() % 40))
    from elastic_megatron.config import load_config
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

    cfg = load_config(None, ["data.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=4"])
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    yield cfg, build_model(cfg, layout, vocab_size=64, dtype=torch.float32)
    destroy_distributed()


def test_a_micro_batch_runs_native_inside_the_remapped_schedule(parent):
    """run_schedule: the forward step and the backward without the remap, the loss (called by
    megatron's schedule, which makes cuda tensors itself) with it."""
    from elastic_megatron.train.loop import lm_forward_step, run_schedule

    cfg, model = parent
    seen = {"forward": [], "loss": [], "backward": []}
    g = torch.Generator().manual_seed(0)

    def batch():
        tokens = torch.randint(0, 64, (2, 16), generator=g)
        return {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(2, 16),
                "position_ids": torch.arange(16).expand(2, 16)}

    def step(data_iterator, mdl):
        seen["forward"].append(_remapped())
        out, loss = lm_forward_step(data_iterator, mdl)
        out.register_hook(lambda grad: seen["backward"].append(_remapped()))

        def loss_func(output):
            seen["loss"].append(_remapped())
            return loss(output)
        return out, loss_func

    losses = run_schedule(model, step, iter([batch(), batch()]), 2, cfg, 16)
    assert len(losses) == 2 and all(torch.isfinite(d["lm loss"]) for d in losses)
    assert seen == {"forward": [False, False], "loss": [True, True], "backward": [False, False]}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.layers[0].parameters())
    model.zero_grad(set_to_none=True)


def test_decoding_runs_native(parent, monkeypatch):
    from elastic_megatron import inference
    from elastic_megatron.data.tokenizer import load_tokenizer

    cfg, model = parent
    seen = []
    step = inference.CachedDecoder.step
    monkeypatch.setattr(inference.CachedDecoder, "step", lambda self, t: (seen.append(_remapped()), step(self, t))[1])
    tok = load_tokenizer(cfg.data.tokenizer)
    inference.greedy_generate(model.eval(), tok, ["q: 1+1=?\n"], 3, cfg.model.hybrid_override_pattern,
                              cfg.model.norm_epsilon, vocab_limit=tok.vocab_size)
    model.train()
    assert seen and not any(seen)
