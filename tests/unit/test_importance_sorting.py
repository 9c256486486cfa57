"""Importance estimation and importance sorting of the tiny parent on one CPU process (TP=1)."""

from __future__ import annotations

import os

import pytest
import torch

from elastic_megatron.config import load_config

OVERRIDES = ["train.micro_batch_size=2", "train.global_batch_size=2", "data.seq_length=48",
             "elastic.importance_batches=2"]
VOCAB = 64


@pytest.fixture(scope="module")
def setup():
    os.environ.setdefault("MASTER_PORT", str(29800 + os.getpid() % 90))
    from elastic_megatron.data.synthetic import SyntheticReasoningDataset
    from elastic_megatron.elastic.importance import calibration_batches, estimate_importance
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second intra-op thread only spins (10x slower on a busy box)
    cfg = load_config(None, OVERRIDES)
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    batches = calibration_batches(SyntheticReasoningDataset(48, 64, seed=3), cfg, layout)
    model = build_model(cfg, layout, VOCAB, torch.float32).eval()
    scores = estimate_importance(model, batches, cfg, layout)
    yield cfg, layout, batches, model, scores
    destroy_distributed()
    torch.set_num_threads(threads)


def fresh(cfg, layout):
    from elastic_megatron.model.hybrid import build_model

    return build_model(cfg, layout, VOCAB, torch.float32).eval()


def logits(model, batches, skip=()):
    """Full logits per batch, the layers in `skip` replaced by the identity via a forward hook."""
    hooks = [model.decoder.layers[j].register_forward_hook(
        lambda mod, args, kwargs, out: (kwargs["hidden_states"], None) if isinstance(out, tuple)
        else kwargs["hidden_states"], with_kwargs=True) for j in skip]
    try:
        with torch.no_grad():
            return [model(b["tokens"], b["position_ids"], None) for b in batches]
    finally:
        for h in hooks:
            h.remove()


def nmse(full, out):
    return sum(((f - o) ** 2).sum().item() for f, o in zip(full, out)) / sum((f ** 2).sum().item() for f in full)


# ----------------------------------------------------------------------------- importance

def test_scores_have_the_right_shapes_and_are_positive(setup):
    cfg, _, _, _, s = setup
    m, p = cfg.model, cfg.model.hybrid_override_pattern
    assert s.hidden.shape == (m.hidden_size,)
    assert [t.shape for t in s.ffn] == [(m.ffn_hidden_size,)] * p.count("-")
    assert [t.shape for t in s.attn] == [(m.num_attention_heads,)] * p.count("*")
    assert [t.shape for t in s.mamba_heads] == [(m.mamba_num_heads,)] * p.count("M")
    assert [t.shape for t in s.mamba_head_dim] == [(m.mamba_head_dim,)] * p.count("M")
    for t in [s.hidden, *s.ffn, *s.attn, *s.mamba_heads, *s.mamba_head_dim]:
        assert torch.isfinite(t).all() and (t >= 0).all() and t.max() > 0
    assert sorted(s.layer_order) == list(range(m.num_layers))


def test_hidden_and_ffn_scores_follow_the_minitron_aggregation(setup):
    """Recompute by hand: mean over sequence, L2 over batch and calibration batches; hidden = sum over norms."""
    cfg, _, batches, model, s = setup
    norms = {name: mod for name, mod in model.named_modules()
             if name.endswith(("norm", "layernorm")) and "mixer" not in name and list(mod.parameters())}
    assert len(norms) == cfg.model.num_layers + 1  # one pre-norm per layer + the final norm
    acts = {name: [] for name in [*norms, "fc2"]}
    hooks = [mod.register_forward_hook(lambda mod, a, out, name=name: acts[name].append(out))
             for name, mod in norms.items()]
    hooks.append(model.decoder.layers[1].mlp.linear_fc2.register_forward_pre_hook(
        lambda mod, a: acts["fc2"].append(a[0])))
    try:
        logits(model, batches)
    finally:
        for h in hooks:
            h.remove()
    agg = lambda xs: torch.stack([x.abs().mean(0) for x in xs]).pow(2).sum((0, 1)).sqrt()  # noqa: E731
    torch.testing.assert_close(s.ffn[0], agg(acts["fc2"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(s.hidden, sum(agg(acts[name]) for name in norms), rtol=1e-5, atol=0)


def test_importance_is_deterministic_and_saves(setup, tmp_path):
    from elastic_megatron.elastic.importance import ImportanceScores, estimate_importance

    cfg, layout, batches, model, s = setup
    cfg_cos = load_config(None, [*OVERRIDES, "elastic.depth_metric=cosine"])
    again = estimate_importance(model, batches, cfg_cos, layout)  # width scores do not depend on the metric
    for a, b in zip([s.hidden, *s.ffn, *s.attn, *s.mamba_heads, *s.mamba_head_dim],
                    [again.hidden, *again.ffn, *again.attn, *again.mamba_heads, *again.mamba_head_dim]):
        assert torch.equal(a, b)
    assert again.depth_metric == "cosine" and sorted(again.layer_order) == list(range(cfg.model.num_layers))
    assert again.layer_order == sorted(range(10), key=lambda j: -again.layer_scores[j])
    s.save(tmp_path / "imp.pt")
    back = ImportanceScores.load(tmp_path / "imp.pt")
    assert back.layer_order == s.layer_order and torch.equal(back.hidden, s.hidden)
    assert all(torch.equal(a, b) for a, b in zip(back.mamba_heads, s.mamba_heads))


def test_nmse_depth_is_iterative_greedy_removal(setup):
    """layer_scores = single-removal nmse (checked by hand); the removal order is greedy and iterative."""
    cfg, _, batches, model, s = setup
    L = cfg.model.num_layers
    full = logits(model, batches)
    single = [nmse(full, logits(model, batches, skip=[j])) for j in range(L)]
    torch.testing.assert_close(torch.tensor(s.layer_scores), torch.tensor(single), rtol=1e-4, atol=1e-9)
    first = s.layer_order[-1]
    assert first == min(range(L), key=lambda j: single[j])
    second = min((j for j in range(L) if j != first), key=lambda j: nmse(full, logits(model, batches, [first, j])))
    assert s.layer_order[-2] == second
    assert s.layer_order != list(range(L))


# ----------------------------------------------------------------------------- sorting

def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None and torch.is_tensor(v)}


def test_sorting_keeps_the_function_and_sorts_every_axis(setup):
    from elastic_megatron.elastic.importance import estimate_importance
    from elastic_megatron.elastic.sorting import sort_parent

    cfg, layout, batches, _, s = setup
    model = fresh(cfg, layout)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=g)
    rand = [{"tokens": tokens, "position_ids": torch.arange(40).expand(2, 40)}]
    before, w0 = logits(model, rand)[0], _state(model)
    plan = sort_parent(model, s, cfg.model, layout)
    after = logits(model, rand)[0]
    assert (after - before).abs().max().item() <= 1e-5
    assert not torch.equal(plan.hidden, torch.arange(cfg.model.hidden_size))  # something really moved
    assert not torch.equal(model.state_dict()["embedding.word_embeddings.weight"],
                           w0["embedding.word_embeddings.weight"])

    # Re-estimating on the sorted parent gives the permuted scores, descending per axis / group.
    m = cfg.model
    cfg_cos = load_config(None, [*OVERRIDES, "elastic.depth_metric=cosine"])  # width only: skip the nmse search
    resorted = estimate_importance(model, batches, cfg_cos, layout)
    expected = plan.permute_scores(s)
    torch.testing.assert_close(resorted.hidden, expected.hidden, rtol=1e-5, atol=1e-6)
    for a, b in zip(resorted.mamba_heads + resorted.ffn + resorted.attn, expected.mamba_heads + expected.ffn
                    + expected.attn):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    desc = lambda t, blocks=1: (t.view(blocks, -1).diff(dim=1) <= 1e-6 * t.max()).all()  # noqa: E731
    assert desc(resorted.hidden) and all(desc(t) for t in resorted.ffn + resorted.mamba_head_dim)
    assert all(desc(t, m.mamba_num_groups) for t in resorted.mamba_heads)
    assert all(desc(t, m.num_query_groups) for t in resorted.attn)
    assert not all(desc(t) for t in resorted.mamba_heads)  # ... but not globally: groups are respected


def test_sorting_is_group_aware(setup):
    """Tag rows/channels with their index, sort, and read back where each one went."""
    from elastic_megatron.elastic.sorting import sort_parent

    cfg, layout, _, _, s = setup
    m = cfg.model
    H, P, G, N = m.mamba_num_heads, m.mamba_head_dim, m.mamba_num_groups, m.mamba_state_dim
    d, bc, hpg = H * P, G * N, H // G
    model = fresh(cfg, layout)
    mixer = model.decoder.layers[0].mixer
    attn = model.decoder.layers[3].self_attention
    real_bc = mixer.in_proj.weight[2 * d:2 * d + 2 * bc].clone()
    real_conv_bc = mixer.conv1d.weight[d:].clone()
    plan = sort_parent(model, s, m, layout)
    assert torch.equal(mixer.in_proj.weight[2 * d:2 * d + 2 * bc], real_bc[:, plan.hidden])
    assert torch.equal(mixer.conv1d.weight[d:], real_conv_bc)  # B/C conv channels bit-identical

    model = fresh(cfg, layout)
    mixer, attn = model.decoder.layers[0].mixer, model.decoder.layers[3].self_attention
    rows = torch.arange(mixer.in_proj.weight.shape[0], dtype=torch.float32)
    with torch.no_grad():  # every row constant = its index, so the hidden column permutation is invisible
        mixer.in_proj.weight.copy_(rows[:, None].expand_as(mixer.in_proj.weight))
        mixer.conv1d.weight.copy_(torch.arange(d + 2 * bc, dtype=torch.float32)[:, None, None].expand_as(
            mixer.conv1d.weight))
        mixer.A_log.copy_(torch.arange(H, dtype=torch.float32))
        mixer.out_proj.weight.copy_(torch.arange(d, dtype=torch.float32)[None, :].expand_as(mixer.out_proj.weight))
        qkv = attn.linear_qkv.weight
        qkv.copy_(torch.arange(qkv.shape[0], dtype=torch.float32)[:, None].expand_as(qkv))
    sort_parent(model, s, m, layout)
    w = mixer.in_proj.weight[:, 0].long()
    heads = mixer.A_log.long()
    assert torch.equal(heads // hpg, torch.arange(H) // hpg) and not torch.equal(heads, torch.arange(H))
    assert torch.equal(w[2 * d + 2 * bc:] - 2 * d - 2 * bc, heads)  # dt rows follow the heads
    assert torch.equal(w[2 * d:2 * d + 2 * bc], torch.arange(2 * d, 2 * d + 2 * bc))  # B/C rows stay
    z, x = w[:d].view(H, P), w[d:2 * d].view(H, P) - d
    assert torch.equal(z, x)  # z and x move together
    assert torch.equal(z // P, heads[:, None].expand(H, P))  # each head's channels stay in that head
    dim = z % P
    assert torch.equal(dim, dim[:1].expand(H, P))  # one head-dim permutation for every head
    assert torch.equal(mixer.conv1d.weight[:d, 0, 0].long(), w[d:2 * d] - d)  # conv x channels follow x
    assert torch.equal(mixer.conv1d.weight[d:, 0, 0].long(), torch.arange(d, d + 2 * bc))
    assert torch.equal(mixer.out_proj.weight[0].long(), x.reshape(-1))  # out_proj columns follow x

    # attention: per KV group block [q.., k, v]; queries move inside their group, K/V stay
    q, kv, ng = m.num_attention_heads // m.num_query_groups, m.kv_channels, m.num_query_groups
    got = attn.linear_qkv.weight[:, 0].long().view(ng, q + 2, kv)
    block = torch.arange(ng * (q + 2) * kv).view(ng, q + 2, kv)
    assert torch.equal(got[:, q:], block[:, q:])
    assert torch.equal(got[:, :q] - got[:, :q, :1], torch.arange(kv).expand(ng, q, kv))  # whole heads move
    src_head = got[:, :q, 0] // kv  # old position (within everything) of each new query head row
    assert torch.equal(src_head // (q + 2), torch.arange(ng)[:, None].expand(ng, q))
    assert sorted(src_head.flatten().tolist()) == sorted(block[:, :q, 0].flatten().div(kv).long().tolist())


def test_plan_ranks_ffn_globally_and_deals_it_out_round_robin(setup):
    from elastic_megatron.elastic.sorting import ffn_layout, ffn_relay_index, ranking, sort_plan

    cfg, _, _, _, s = setup
    m = cfg.model
    plan = sort_plan(s, m)
    for perm, score in zip(plan.ffn, s.ffn):
        assert torch.equal(perm, score.argsort(descending=True, stable=True))
    # TP=2: shard 0 holds ranks 0, 2, 4, ..., shard 1 ranks 1, 3, 5, ...; the per-shard prefixes of
    # f / 2 neurons are then the f best overall, for every f
    assert ffn_layout(8, 1).tolist() == list(range(8))
    assert ffn_layout(8, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert ffn_layout(8, 4).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    for tp in (1, 2, 4):
        lay = ffn_layout(8, tp)
        for f in range(tp, 9, tp):
            kept = torch.cat([lay[r * 8 // tp: r * 8 // tp + f // tp] for r in range(tp)])
            assert sorted(kept.tolist()) == list(range(f)), (tp, f)
    # re-laying TP a -> TP b gives exactly the TP b layout, and a -> b -> a is the identity
    ranks = torch.arange(8)
    for a in (1, 2, 4):
        for b in (1, 2, 4):
            moved = ffn_layout(8, a)[ffn_relay_index(8, a, b)]
            assert torch.equal(moved, ffn_layout(8, b)), (a, b)
            assert torch.equal(ranks[ffn_relay_index(8, a, b)][ffn_relay_index(8, b, a)], ranks)
    with pytest.raises(ValueError, match="do not split"):
        ffn_layout(6, 4)
    assert torch.equal(ranking(torch.tensor([1., 3., 2., 0.5, 4., 0.]), 2), torch.tensor([1, 2, 0, 4, 3, 5]))
    with pytest.raises(ValueError, match="equal blocks"):
        ranking(torch.ones(5), 2)
