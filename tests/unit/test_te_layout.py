"""The elastic path on a model with Transformer Engine's parameter layout (CPU stand-in, tests/te_standin.py).

On a GPU, `model.backend=auto` builds megatron's TE spec, whose pre-norms are fused into the next
linear (`mixer.in_proj.layer_norm_weight`, ...). Checked here under that layout: megatron's own
forward equals the local spec's, the elastic forward equals megatron's, sorting keeps the function,
slicing equals the parent under the subnet, cached decoding matches, and a checkpoint saved under
one spec loads under the other bit-identically.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from elastic_megatron.config import load_config
from elastic_megatron.elastic.subnet import Subnet

VOCAB = 64
T, F = True, False
SUBNET = Subnet(144, (12, 8, 12, 8), (18, 24, 12, 18), (4, 8), (384, 192, 576, 384), (T, F, T, T, T, T, F, T, T, F))


@pytest.fixture(scope="module")
def env():
    os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 90))
    import elastic_megatron.model.spec as spec
    from elastic_megatron.compat import backends
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed
    from tests.te_standin import te_layout_spec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.backend=local"])
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    original, machine = spec.te_stack_spec, backends.probe()
    spec.te_stack_spec = te_layout_spec  # what model.backend=te builds, here
    # the ladder would refuse te on CPU: pretend TE imports (its layout is the stand-in's)
    backends.set_probe(backends.Probe(cuda=False, te=None, triton="CPU stand-in: no Triton kernels"))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=g)
    yield cfg, layout, tokens, torch.arange(40).expand(2, 40)
    spec.te_stack_spec = original
    backends.set_probe(machine)
    destroy_distributed()
    torch.set_num_threads(threads)


def build(cfg, layout, backend: str, perturb: bool = False):
    """The model under `backend`; perturb: every weight moved off its init (norms are ones there,
    which would hide a norm that sorting or loading left out)."""
    from elastic_megatron.model.hybrid import build_model

    model = build_model(replace(cfg, model=replace(cfg.model, backend=backend)), layout, VOCAB, torch.float32).eval()
    if perturb:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal to fp32 rounding: `tol` relative to the larger logit (at least 1)."""
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@torch.no_grad()
def copy_weights(src, dst, pattern: str) -> None:
    """src's weights into dst (the other spec): shared names directly, pre-norms through model/weights.py."""
    from elastic_megatron.model.weights import pre_norm_weight

    theirs = dict(dst.named_parameters())
    for n, p in src.named_parameters():
        if n in theirs:
            theirs[n].copy_(p)
    for i, (a, b) in enumerate(zip(src.decoder.layers, dst.decoder.layers)):
        pre_norm_weight(b, pattern[i]).copy_(pre_norm_weight(a, pattern[i]))


def test_stand_in_has_te_parameter_layout(env):
    cfg, layout, *_ = env
    names = dict(build(cfg, layout, "te").named_parameters())
    for name in ("decoder.layers.0.mixer.in_proj.layer_norm_weight", "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
                 "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"):
        assert name in names, name
    assert not any(n.endswith(("layers.0.norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight")) for n in names)


def test_elastic_forward_equals_megatron_under_both_specs(env):
    from elastic_megatron.elastic.model import ElasticHybrid

    cfg, layout, tokens, pos = env
    local, te = build(cfg, layout, "local", perturb=True), build(cfg, layout, "te")
    copy_weights(local, te, cfg.model.hybrid_override_pattern)
    with torch.no_grad():
        ref = local(tokens, pos, None)
        assert close(te(tokens, pos, None), ref)  # the stand-in is the same model
        for model in (local, te):
            assert close(ElasticHybrid(model, cfg, layout)(tokens, pos), model(tokens, pos, None))
        under = [ElasticHybrid(m, cfg, layout)(tokens, pos, subnet=SUBNET) for m in (local, te)]
    assert close(under[0], under[1]) and not close(under[0], ref, 1e-3)


def test_sorting_keeps_function_and_slicing_matches_under_te_layout(env):
    from elastic_megatron.elastic.importance import calibration_batches, estimate_importance
    from elastic_megatron.elastic.model import ElasticHybrid
    from elastic_megatron.elastic.slicing import gather_full_state, load_full_state, slice_state, sliced_model_config
    from elastic_megatron.elastic.sorting import sort_parent
    from elastic_megatron.data.synthetic import SyntheticReasoningDataset

    cfg, layout, tokens, pos = env
    te = build(cfg, layout, "te", perturb=True)
    icfg = load_config(None, ["model.backend=local", "train.micro_batch_size=2", "train.global_batch_size=2",
                              "data.seq_length=48", "elastic.importance_batches=2"])
    scores = estimate_importance(te, calibration_batches(SyntheticReasoningDataset(48, 64, seed=3), icfg, layout),
                                 icfg, layout)
    assert scores.hidden.shape == (cfg.model.hidden_size,) and float(scores.hidden.abs().sum()) > 0
    with torch.no_grad():
        before = te(tokens, pos, None)
        w_before = te.decoder.layers[0].mixer.in_proj.layer_norm_weight.clone()
        sort_parent(te, scores, cfg.model, layout)
        assert close(te(tokens, pos, None), before)
        assert not torch.equal(te.decoder.layers[0].mixer.in_proj.layer_norm_weight, w_before)  # it moved with hidden
        want = ElasticHybrid(te, cfg, layout)(tokens, pos, subnet=SUBNET)
    small_cfg = replace(cfg, model=replace(sliced_model_config(cfg.model, SUBNET), backend="te"))
    small = build(small_cfg, layout, "te")
    load_full_state(small, slice_state(gather_full_state(te, cfg, layout), cfg.model, SUBNET), small_cfg, layout)
    with torch.no_grad():
        assert close(small(tokens, pos, None), want)


def test_cached_decoding_under_te_layout(env):
    from elastic_megatron.inference import CachedDecoder

    cfg, layout, tokens, pos = env
    te = build(cfg, layout, "te")
    dec = CachedDecoder(te, cfg.model.hybrid_override_pattern, cfg.model.norm_epsilon)
    with torch.no_grad():
        full = te(tokens[:, :8], pos[:, :8], None)
        steps = torch.stack([dec.step(tokens[:, t]) for t in range(8)], dim=1)
    assert close(steps, full, 1e-4)


@pytest.mark.parametrize("save_as, load_as", [("local", "te"), ("te", "local")])
def test_checkpoint_moves_between_specs_bit_identically(env, tmp_path, save_as, load_as):
    from elastic_megatron.model.weights import pre_norm_weight
    from elastic_megatron.train.checkpoint import load_checkpoint, save_checkpoint

    cfg, layout, tokens, pos = env
    src = build(cfg, layout, save_as, perturb=True)
    path = save_checkpoint(tmp_path, 1, src, None, {"step": 1})
    dst = build(cfg, layout, load_as)
    load_checkpoint(path, dst)
    pattern = cfg.model.hybrid_override_pattern
    for i, (a, b) in enumerate(zip(src.decoder.layers, dst.decoder.layers)):
        assert torch.equal(pre_norm_weight(a, pattern[i]), pre_norm_weight(b, pattern[i])), i
    moved = {n: p for n, p in dst.named_parameters()}
    for n, p in src.named_parameters():
        if n in moved:  # every name both specs share
            assert torch.equal(p, moved[n]), n
    with torch.no_grad():
        assert close(dst(tokens, pos, None), src(tokens, pos, None))


def test_checkpoint_with_the_old_local_norm_keys_still_loads(env, tmp_path, monkeypatch):
    """Written before the canonical (TE) keys: norms under `norm.weight`, `input_layernorm.weight`,
    `pre_mlp_layernorm.weight`. Loading reads them from there, under either spec."""
    import elastic_megatron.model.spec as spec
    from elastic_megatron.model.weights import pre_norm_weight
    from elastic_megatron.train.checkpoint import load_checkpoint, save_checkpoint

    cfg, layout, tokens, pos = env
    monkeypatch.setattr(spec, "CANONICAL_KEYS", {"M": {}, "*": {}, "-": {}})  # the old local spec
    old = build(cfg, layout, "local", perturb=True)
    path = save_checkpoint(tmp_path, 1, old, None, {"step": 1})
    monkeypatch.undo()
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    assert "decoder.layers.0.norm.weight" in keys and not any("layer_norm_weight" in k for k in keys)
    for backend in ("local", "te"):
        new = build(cfg, layout, backend)
        load_checkpoint(path, new)
        for i, (a, b) in enumerate(zip(old.decoder.layers, new.decoder.layers)):
            assert torch.equal(pre_norm_weight(a, cfg.model.hybrid_override_pattern[i]),
                               pre_norm_weight(b, cfg.model.hybrid_override_pattern[i])), (backend, i)
        with torch.no_grad():
            assert close(new(tokens, pos, None), old(tokens, pos, None))
