"""Peer baseline (issue 23 part 3): nvidia-modelopt's Minitron pruning (`mcore_minitron`) of the demo's
trained parent to our homogeneous architecture per budget, then distilled exactly like ablation arm
(a)(iii) `prune_distill_share` (same frozen teacher, the family's share of tokens), plus the Spearman
rank correlation between modelopt's importance and ours per axis.

    pip install --no-deps --target /tmp/mo_site nvidia-modelopt==0.46.0 pulp==3.3.2
    python benchmarks/modelopt_arm.py --demo /tmp/i23/seed1234 --out /tmp/s10/mo_out --site /tmp/mo_site

modelopt lives in a private directory (--site), never the main environment. It runs here on CPU
(gloo, world 1, local spec, no Transformer Engine) only with the patches in `patch_modelopt` (each
one commented). The demo directory is only read.

Route: modelopt prunes the parent (its own hooks, scores, sorting and slicing) to the export_config
of each budget. Its pruned weights are matched back, row by row, to the parent's to record which
hidden channels / FFN neurons / Mamba heads and head dims it kept (asserted exact). modelopt's
scores, put in our ImportanceScores format, re-order the parent through our `sort_parent`; the
result is saved as a checkpoint, and our homogeneous Subnet cut from it is modelopt's pruned model
(checked: max |logit diff| ~1e-5 on the calibration batches). That checkpoint is the start of
`ablations.train_fixed` with the arm's share of steps. Distillation is ours; modelopt's
(`modelopt.torch.distill`, LogitsDistillationLoss) is checked to compute the same per-token KD and
to run a few steps (`kd_check`). Attention heads: modelopt's head pruning needs TE (it asserts
TEDotProductAttention), so it is off. Where the homogeneous architecture cuts heads (0.5), our head
ranking picks them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PATCHES: list[str] = []  # one line per patch applied, for the report


def say(msg: str) -> None:
    print(f"[modelopt_arm] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- modelopt on CPU

def import_modelopt(site: str):
    """modelopt from the private --site; on failure the exact exception as one line, exit 2."""
    sys.path.insert(0, site)
    try:
        import modelopt  # the rest is imported after patch_modelopt (its plugins need the stubs)
        return modelopt
    except Exception as e:  # noqa: BLE001
        print(f"MODELOPT_IMPORT_FAILED {type(e).__name__}: {e}".replace("\n", " "), flush=True)
        raise SystemExit(2)


def patch_modelopt(site: str):
    """Make modelopt 0.46.0's mcore_minitron run on our CPU model (local spec, no TE). Called after
    the model is built (megatron has decided HAVE_TE = False by then)."""
    import megatron.core.extensions.transformer_engine as mte
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
    )
    from torch import nn

    # 1. transformer_engine stub: nas/plugins/megatron.py does `import transformer_engine as te` and
    #    registers te.pytorch.{LayerNorm,RMSNorm}; megatron's TE wrappers are MagicMocks without TE,
    #    which modelopt subclasses / registers as keys: replace them by inert nn.Module classes.
    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    te.pytorch.LayerNorm = type("TEStubLayerNorm", (nn.Module,), {})
    te.pytorch.RMSNorm = type("TEStubRMSNorm", (nn.Module,), {})
    sys.modules.setdefault("transformer_engine", te)
    sys.modules.setdefault("transformer_engine.pytorch", te.pytorch)
    for name in ("TEColumnParallelLinear", "TERowParallelLinear", "TELinear", "TELayerNormColumnParallelLinear",
                 "TEDotProductAttention", "TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear"):
        setattr(mte, name, type(f"Stub{name}", (nn.Module,), {}))
    PATCHES.append("1. stub `transformer_engine` module (te.pytorch.LayerNorm/RMSNorm inert classes) and megatron's "
                   "TE wrapper MagicMocks/None (TEColumnParallelLinear, ..., TEDotProductAttention, grouped) replaced "
                   "by inert nn.Module classes before modelopt's megatron plugin imports them")
    # 1b. modelopt's Mamba plugin is gated on `import mamba_ssm`; on CPU our Mamba runs the
    #     pure-PyTorch scan and mamba_ssm is absent: an empty stub package (nothing of it is used)
    if "mamba_ssm" not in sys.modules:
        try:
            import mamba_ssm  # noqa: F401
        except ImportError:
            stub = types.ModuleType("mamba_ssm")
            stub.__path__ = []
            sys.modules["mamba_ssm"] = stub
            PATCHES.append("1b. empty `mamba_ssm` stub module (modelopt's Mamba support is gated on importing it; "
                           "on CPU our Mamba layers use the pure-PyTorch scan)")
    try:
        import modelopt.torch.nas.plugins.megatron as nm
        import modelopt.torch.prune as mtp  # noqa: F401
        import modelopt.torch.prune.plugins.mcore_minitron as mm
    except Exception as e:  # noqa: BLE001
        print(f"MODELOPT_IMPORT_FAILED {type(e).__name__}: {e}".replace("\n", " "), flush=True)
        raise SystemExit(2)
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry
    from modelopt.torch.nas.traced_hp import TracedHp

    if not nm.HAS_MAMBA:
        raise RuntimeError("modelopt did not register its Mamba plugin (HAS_MAMBA False)")

    # 2. torch.nn.RMSNorm (our local spec's pre-norms and final norm) as a dynamic module
    @DMRegistry.register({nn.RMSNorm: "nn.RMSNorm"})
    class _DynamicTorchRMSNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features: TracedHp | None = None):
            if num_features is None:
                num_features = TracedHp(list(range(1, self.normalized_shape[-1] + 1)))
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)
    PATCHES.append("2. DMRegistry entry for torch.nn.RMSNorm (weight sliced, normalized_shape follows num_features)")

    # 3. local linears have no in_features/out_features (TE naming read by the attention setup);
    #    attention-head pruning asserts TEDotProductAttention: off, hidden-only attention
    ColumnParallelLinear.out_features = property(lambda self: self.output_size)
    ColumnParallelLinear.in_features = property(lambda self: self.input_size)
    RowParallelLinear.out_features = property(lambda self: self.output_size)
    RowParallelLinear.in_features = property(lambda self: self.input_size)
    nm._DynamicSelfAttention._prunes_attention_heads = lambda self: False
    PATCHES.append("3. in_features/out_features aliases on megatron's local Column/RowParallelLinear; "
                   "_DynamicSelfAttention._prunes_attention_heads -> False (head pruning asserts TEDotProductAttention)")

    # 4. hidden axis: modelopt hooks the norm fused into TE linears; ours are separate modules.
    #    The same statistic (mean |x| over seq, squared, summed over batch; sqrt per hook; summed)
    #    on every separate pre-norm output (Mamba norm, input_layernorm, pre_mlp_layernorm).
    def _register_hidden(module, registry):
        module._register_temp_attribute("_activations", {})

        def hook(mod, inner, inp, out):
            a = out.detach().to(torch.float32).abs().mean(dim=0).pow(2).sum(dim=0)
            mod._activations[id(inner)] = mod._activations[id(inner)] + a if id(inner) in mod._activations else a

        for layer in module.decoder.layers:
            for attr in ("norm", "input_layernorm", "pre_mlp_layernorm"):
                n = getattr(layer, attr, None)
                if isinstance(n, nn.RMSNorm):
                    registry.register_hook(n, lambda m, i, o, mod=module: hook(mod, m, i, o), hook_type="forward")

        def estimate():
            act = torch.stack([v.pow(0.5) for v in module._activations.values()]).sum(dim=0)
            torch.distributed.all_reduce(act)
            return act
        registry.register_importance(module, "hidden_size", estimate)
    mm._register_hidden_size_importance = _register_hidden
    PATCHES.append("4. hidden_size importance hooks on the separate pre-norm modules (MambaLayer.norm, "
                   "input_layernorm, pre_mlp_layernorm) instead of TE's fused LayerNormLinear, same statistic")

    # 5. the Mamba layer's own pre-norm (fused into in_proj under TE) must follow hidden_size
    orig_setup, orig_export = nm._DynamicMambaLayer._setup, nm._DynamicMambaLayer.export

    def mamba_setup(self, *, hidden_size):
        orig_setup(self, hidden_size=hidden_size)
        if isinstance(self.norm, nn.RMSNorm):
            DMRegistry.convert(self.norm, num_features=hidden_size)

    def mamba_export(self):
        if hasattr(self.norm, "export"):
            self.norm.export()
        return orig_export(self)
    nm._DynamicMambaLayer._setup, nm._DynamicMambaLayer.export = mamba_setup, mamba_export
    PATCHES.append("5. _DynamicMambaLayer also converts / exports its separate `norm` (RMSNorm) on hidden_size")

    # record modelopt's importance of every hparam at the moment it sorts (for the rank correlation)
    captured: dict = {}
    orig_sort = mm.sort_parameters

    def sort_and_record(model, hps_to_sort=None, verbose=False):
        from modelopt.torch.opt.utils import named_hparams
        for n, hp in named_hparams(model, unique=True):
            if hp._importance_estimators and len(hp._importance_estimators) > 1:
                imp = hp._get_importance()
                if imp is not None:
                    captured[n] = {"importance": torch.as_tensor(imp).detach().cpu().clone(),
                                   "is_order": bool(getattr(hp, "_importance_is_order", False))}
        for n, m in model.named_modules():
            a = getattr(m, "_activations", None)
            if torch.is_tensor(a):
                captured[f"{n}._activations"] = {"importance": a.detach().cpu().clone(), "is_order": False}
        captured["layer_scores"] = {"importance": torch.tensor(
            [float(layer._scores) for layer in model.decoder.layers]), "is_order": False}
        return orig_sort(model, hps_to_sort, verbose)
    mm.sort_parameters = sort_and_record
    return captured


# ----------------------------------------------------------------------------- phase 1: prune (subprocess)

def _parent_cfg(demo_root: Path):
    """The importance step's config: the trained, unsorted parent it scored (demo/parent/checkpoints)."""
    from elastic_megatron.config import load_config

    cfg = load_config(str(demo_root / "importance" / "sorted" / "config.yaml"))
    return cfg


def _batches(cfg, layout, tok):
    from elastic_megatron.data.build import build_datasets
    from elastic_megatron.elastic.importance import calibration_batches

    ds, _ = build_datasets(cfg, tok, num_train=cfg.elastic.importance_batches * cfg.train.micro_batch_size)
    return calibration_batches(ds, cfg, layout)


def _logits(model, batches):
    with torch.no_grad():
        return [model(b["tokens"], b["position_ids"], None).float() for b in batches]


def prune_phase(args) -> None:
    """Run modelopt's mcore_minitron per budget on a fresh copy of the parent; write what it kept,
    its scores, and the parent re-ordered by modelopt's ranking (our checkpoint format)."""
    from elastic_megatron.config import to_yaml
    from elastic_megatron.elastic.importance import ImportanceScores
    from elastic_megatron.elastic.jobs import _parent
    from elastic_megatron.elastic.sorting import sort_parent
    from elastic_megatron.elastic.subnet import Subnet
    from elastic_megatron.parallel import destroy_distributed
    from elastic_megatron.train.checkpoint import save_checkpoint

    out = Path(args.out)
    demo_root = Path(args.demo)
    cfg = _parent_cfg(demo_root)
    m = cfg.model
    for old in out.glob("modelopt_search_*"):  # a fresh forward loop, not a previous run's saved scores
        old.unlink()
    homos = {k: Subnet.from_dict(json.loads(Path(v).read_text())["subnet"]) for k, v in
             json.loads((out / "homogeneous.json").read_text()).items()}
    layout, tok, vocab, model, _ = _parent(cfg, 1)
    model.eval()
    batches = _batches(cfg, layout, tok)
    fn: list = []  # our hidden score's extra term: decoder.final_norm's output (modelopt has no hook there)
    h = model.decoder.final_norm.register_forward_hook(
        lambda mod, a, o: fn.append(o.detach().float().abs().mean(dim=0).pow(2).sum(dim=0)))
    parent_logits = _logits(model, batches)
    h.remove()
    torch.save(torch.stack(fn).sum(0).sqrt(), out / "final_norm_term.pt")
    captured = patch_modelopt(args.site)
    import modelopt
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins import mcore_minitron

    def loop(mdl):
        for b in batches:
            mdl(b["tokens"], b["position_ids"], None)

    state = {"modelopt_version": modelopt.__version__, "patches": PATCHES, "budgets": {}}
    ours = ImportanceScores.load(cfg.elastic.importance_path)
    first_capture = None
    for name, homo in homos.items():
        if name != next(iter(homos)):  # a fresh parent per budget (prune changes it in place)
            model = _fresh_parent(cfg, layout, vocab)
        export = {"hidden_size": homo.hidden, "ffn_hidden_size": homo.ffn[0], "mamba_num_heads": homo.mamba_heads[0],
                  "mamba_head_dim": homo.mamba_head_dim[0]}
        mcfg = mcore_minitron.get_mcore_minitron_config(hidden_size_divisor=8, ffn_hidden_size_divisor=32,
                                                        mamba_head_dim_divisor=8, num_layers_divisor=1)
        t0 = time.time()
        captured.clear()
        pruned, _ = mtp.prune(model, mode=[("mcore_minitron", mcfg)], constraints={"export_config": export},
                              dummy_input=None,
                              config={"forward_loop": loop, "seq_length": cfg.data.seq_length,
                                      "batch_size": cfg.train.micro_batch_size,
                                      "checkpoint": str(out / f"modelopt_search_{name}.pth")})
        dt = time.time() - t0
        say(f"budget {name}: modelopt pruned to {export} in {dt:.1f} s")
        first_capture = first_capture or {k: v for k, v in captured.items()}
        kept = _kept_indices(pruned, cfg, vocab, layout, homo)
        pruned_logits = _logits(pruned, batches)
        n_params = sum(p.numel() for p in pruned.parameters())
        state["budgets"][name] = {"export_config": export, "prune_s": round(dt, 1), "kept": kept,
                                  "modelopt_params": n_params}
        torch.save({"logits": pruned_logits}, out / f"modelopt_logits_{name}.pt")
        del pruned
    torch.save(first_capture, out / "modelopt_importance.pt")
    # modelopt's scores in our format; attention heads (not ranked by modelopt here) stay ours
    mo = scores_from_modelopt(first_capture, m, ours)
    mo.save(out / "modelopt_scores.pt")
    model = _fresh_parent(cfg, layout, vocab)
    sort_parent(model, mo, m, layout)
    sorted_cfg = replace(cfg, elastic=replace(cfg.elastic, sort_tensor_parallel=1,
                                              importance_path=str(out / "modelopt_scores.pt")))
    (out / "mo_sorted").mkdir(parents=True, exist_ok=True)
    (out / "mo_sorted" / "config.yaml").write_text(to_yaml(sorted_cfg))
    ckpt = save_checkpoint(out / "mo_sorted" / "checkpoints", 0, model, None,
                           {"step": 0, "sorted": True, "ffn_layout_tp": 1, "layer_order": mo.layer_order,
                            "config": to_yaml(sorted_cfg)})
    state["mo_sorted_checkpoint"] = str(ckpt)
    state["parent_max_abs_logit"] = float(max(lg.abs().max() for lg in parent_logits))
    try:
        state["modelopt_kd"] = kd_check(cfg, layout, vocab, batches, homos, loop, out)
    except Exception as e:  # noqa: BLE001  (recorded, not fatal: the arm distills with train_fixed)
        import traceback
        traceback.print_exc()
        state["modelopt_kd"] = {"failed": f"{type(e).__name__}: {e}".replace("\n", " ")[:500]}
    (out / "prune_state.json").write_text(json.dumps(state, indent=1))
    destroy_distributed()


def kd_check(cfg, layout, vocab, batches, homos, loop, out: Path, steps: int = 12) -> dict:
    """modelopt's distillation (mtd.convert, kd_loss mode, LogitsDistillationLoss) on the 0.75 pruned
    model with the frozen parent as teacher: (1) its per-token loss vs our kd_loss on the same logits,
    (2) `steps` AdamW steps on the calibration batches (the loss must fall), (3) mtd.export."""
    import modelopt.torch.distill as mtd
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins import mcore_minitron

    from elastic_megatron.elastic.distill import kd_loss

    name = next(n for n, h in homos.items() if all(a == cfg.model.num_attention_heads for a in h.attn_heads))
    homo = homos[name]
    export = {"hidden_size": homo.hidden, "ffn_hidden_size": homo.ffn[0], "mamba_num_heads": homo.mamba_heads[0],
              "mamba_head_dim": homo.mamba_head_dim[0]}
    mcfg = mcore_minitron.get_mcore_minitron_config(hidden_size_divisor=8, ffn_hidden_size_divisor=32,
                                                    mamba_head_dim_divisor=8, num_layers_divisor=1)
    student, _ = mtp.prune(_fresh_parent(cfg, layout, vocab), mode=[("mcore_minitron", mcfg)],
                           constraints={"export_config": export}, dummy_input=None,
                           config={"forward_loop": loop, "checkpoint": str(out / "modelopt_search_kd.pth")})
    teacher = _fresh_parent(cfg, layout, vocab)
    for p in teacher.parameters():
        p.requires_grad_(False)
    b0 = batches[0]
    with torch.no_grad():
        s_lg = student(b0["tokens"], b0["position_ids"], None).float()
        t_lg = teacher(b0["tokens"], b0["position_ids"], None).float()
    theirs = mtd.LogitsDistillationLoss(temperature=cfg.distill.temperature, reduction="none")(s_lg, t_lg)  # [b, s]
    ours = kd_loss(s_lg.transpose(0, 1).contiguous(), t_lg.transpose(0, 1).contiguous(),
                   cfg.distill.temperature).transpose(0, 1)
    loss_diff = float((theirs - ours).abs().max())
    student.train()
    dm = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher,
                                                 "criterion": mtd.LogitsDistillationLoss(cfg.distill.temperature,
                                                                                         reduction="none")})])
    t = cfg.train
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=t.lr,
                            betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    losses = []
    for step in range(steps):
        b = batches[step % len(batches)]
        opt.zero_grad()
        dm(b["tokens"], b["position_ids"], None)
        mask = b["loss_mask"].float()
        loss = dm.compute_kd_loss(loss_reduction_fn=lambda per_tok, mask=mask: (per_tok * mask).sum() / mask.sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in dm.parameters() if p.requires_grad], t.clip_grad)
        opt.step()
        losses.append(float(loss))
    exported = mtd.export(dm)
    leftovers = [a for a in ("_teacher_model", "_layers_to_loss", "_loss_balancer") if hasattr(exported, a)]
    return {"budget": name, "per_token_kd_max_abs_diff_vs_ours": loss_diff, "kd_mean_ours": float(ours.mean()),
            "steps": steps, "losses": losses, "export_leftover_attrs": leftovers,
            "note": "calibration batches, AdamW with the config's lr/betas/wd, no schedule: a does-it-run check, "
                    "not the arm"}


def _fresh_parent(cfg, layout, vocab):
    from elastic_megatron.elastic.sorting import load_parent
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.train.checkpoint import resolve_checkpoint
    from elastic_megatron.train.loop import run_dtype

    model = build_model(cfg, layout, vocab, run_dtype(cfg.train.precision), initialize=False)
    load_parent(resolve_checkpoint(cfg.checkpoint.load), model, cfg, layout)
    return model.eval()


def _match(pruned_rows: torch.Tensor, parent_rows: torch.Tensor) -> list[int]:
    """For each pruned row, the index of the identical parent row (asserted unique and exact)."""
    d = torch.cdist(pruned_rows.double(), parent_rows.double())
    idx = d.argmin(dim=1)
    assert torch.all(d.min(dim=1).values < 1e-5), f"unmatched rows: max dist {d.min(dim=1).values.max()}"
    assert len(set(idx.tolist())) == len(idx), "two pruned rows matched one parent row"
    return idx.tolist()


def _kept_indices(pruned, cfg, vocab, layout, homo) -> dict:
    """Which parent channels modelopt kept, in modelopt's order, read by matching weights."""
    from elastic_megatron.elastic.subnet import layer_slots

    parent = _fresh_parent(cfg, layout, vocab)
    m = cfg.model
    # hidden: embedding columns (word_embeddings [V, h])
    hidden = _match(pruned.embedding.word_embeddings.weight.T, parent.embedding.word_embeddings.weight.T)
    hid = torch.tensor(hidden)
    kept = {"hidden": hidden, "ffn": [], "mamba_heads": [], "mamba_head_dim": []}
    for i, (kind, k) in enumerate(layer_slots(m.hybrid_override_pattern)):
        pl, ql = parent.decoder.layers[i], pruned.decoder.layers[i]
        if kind == "-":  # fc1 rows restricted to the kept hidden columns
            kept["ffn"].append(_match(ql.mlp.linear_fc1.weight, pl.mlp.linear_fc1.weight[:, hid]))
        elif kind == "M":  # x rows of in_proj, one head = head_dim rows; A_log per head as a check
            H, P = m.mamba_num_heads, m.mamba_head_dim
            d = H * P
            px = pl.mixer.in_proj.weight[d:2 * d][:, hid]  # [H * P, h'] x rows
            h2, P2 = ql.mixer.nheads, ql.mixer.headdim
            qx = ql.mixer.in_proj.weight[h2 * P2:2 * h2 * P2]
            assert P2 == P, "head dim is not pruned in the homogeneous architecture"
            rows = torch.tensor(_match(qx, px)).view(h2, P2)  # modelopt also sorts head dims (one order for all heads)
            heads, dims = (rows // P)[:, 0], rows % P
            assert torch.all(rows // P == heads[:, None]) and torch.all(dims == dims[0]), "not a head x dim product"
            heads = heads.tolist()
            assert torch.allclose(ql.mixer.A_log, pl.mixer.A_log[heads])
            kept["mamba_head_dim"].append(dims[0].tolist())
            kept["mamba_heads"].append(heads)
    return kept


def scores_from_modelopt(cap: dict, m, ours):
    """modelopt's importance as our ImportanceScores (what sort_parent orders by): hidden / ffn its
    normalized importances, Mamba heads its head score (L2 over the head's x channels of its
    sqrt(stat); all head dims kept) and head dim its L2 over heads, depth its cosine layer
    scores; attention heads ours (modelopt ranks them only under TE)."""
    from elastic_megatron.elastic.importance import ImportanceScores
    from elastic_megatron.elastic.subnet import layer_slots

    hidden = next(v["importance"] for k, v in cap.items() if k.split(".")[-1] == "hidden_size")
    ffn, mh, mhd = [], [], []
    for i, (kind, k) in enumerate(layer_slots(m.hybrid_override_pattern)):
        if kind == "-":
            ffn.append(cap[f"decoder.layers.{i}.mlp.ffn_hidden_size"]["importance"].float())
        elif kind == "M":
            act = cap[f"decoder.layers.{i}.mixer._activations"]["importance"].float().sqrt()
            d = m.mamba_num_heads * m.mamba_head_dim
            s = act[d:2 * d].view(m.mamba_num_heads, m.mamba_head_dim)
            mhd.append(s.norm(dim=0))
            mh.append(s.norm(dim=1))
    cos = cap["layer_scores"]["importance"].tolist()
    order = sorted(range(len(cos)), key=lambda j: -cos[j])
    return ImportanceScores(hidden.float(), ffn, list(ours.attn), mhd, mh, order, cos, "cosine")


# ----------------------------------------------------------------------------- checks, correlation

def check_phase(out: Path, demo_root: Path, homos: dict) -> dict:
    """Our homogeneous Subnet (attention heads kept whole, as modelopt left them) cut from the
    modelopt-ordered parent vs modelopt's own pruned model: max |logit difference| per budget."""
    from elastic_megatron.config import load_config
    from elastic_megatron.data.tokenizer import load_tokenizer
    from elastic_megatron.elastic.jobs import slice_subnets
    from elastic_megatron.model.hybrid import build_model, padded_vocab_size
    from elastic_megatron.parallel import (
        ParallelLayout,
        destroy_distributed,
        init_distributed,
    )
    from elastic_megatron.train.checkpoint import latest_checkpoint, load_checkpoint

    st = json.loads((out / "prune_state.json").read_text())
    cfg = _parent_cfg(demo_root)
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, load=st["mo_sorted_checkpoint"]))
    named = {n: replace(h, attn_heads=(cfg.model.num_attention_heads,) * len(h.attn_heads)) for n, h in homos.items()}
    rows = slice_subnets(cfg, named, str(out / "check_slices"))
    res = {}
    for r in rows:
        scfg = load_config(str(Path(r["path"]) / "config.yaml"))
        layout = ParallelLayout.resolve(scfg, 1)
        init_distributed(layout, scfg.train.seed)
        try:
            tok = load_tokenizer(scfg.data.tokenizer)
            model = build_model(scfg, layout, padded_vocab_size(scfg.model, tok.vocab_size, 1), torch.float32).eval()
            load_checkpoint(latest_checkpoint(Path(r["path"]) / "checkpoints"), model)
            pcfg = _parent_cfg(demo_root)
            batches = _batches(pcfg, layout, tok)
            ours = _logits(model, batches)
            theirs = torch.load(out / f"modelopt_logits_{r['budget']}.pt")["logits"]
            diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
            res[r["budget"]] = {"max_abs_logit_diff": diff, "params_subnet_full_attn": r["params"],
                                "params_modelopt": st["budgets"][r["budget"]]["modelopt_params"]}
        finally:
            destroy_distributed()
    return res


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(torch.as_tensor(a).double().numpy(), torch.as_tensor(b).double().numpy()).statistic)


def our_cosine_order(demo_root: Path) -> list[int]:
    """Our importance.py depth ranking with the cosine metric (modelopt's), same checkpoint and batches."""
    from elastic_megatron.elastic.importance import estimate_importance
    from elastic_megatron.elastic.jobs import _parent
    from elastic_megatron.parallel import destroy_distributed

    cfg = _parent_cfg(demo_root)
    cfg = replace(cfg, elastic=replace(cfg.elastic, depth_metric="cosine"))
    layout, tok, _, model, _ = _parent(cfg, 1)
    try:
        model.eval()
        return estimate_importance(model, _batches(cfg, layout, tok), cfg, layout).layer_order
    finally:
        destroy_distributed()


def correlations(out: Path, ours_path: str, ks: dict, demo_root: Path | None = None) -> dict:
    from elastic_megatron.elastic.importance import ImportanceScores

    mo, ours = ImportanceScores.load(out / "modelopt_scores.pt"), ImportanceScores.load(ours_path)
    L = len(ours.layer_order)
    pos = lambda order: [order.index(j) for j in range(L)]
    per = {
        "hidden": [_spearman(mo.hidden, ours.hidden)],
        "ffn": [_spearman(a, b) for a, b in zip(mo.ffn, ours.ffn)],
        "mamba_heads": [_spearman(a, b) for a, b in zip(mo.mamba_heads, ours.mamba_heads)],
        "mamba_head_dim": [_spearman(a, b) for a, b in zip(mo.mamba_head_dim, ours.mamba_head_dim)],
        "depth": [_spearman(pos(mo.layer_order), pos(ours.layer_order))],
    }
    res = {k: {"mean": sum(v) / len(v), "min": min(v), "per_layer": v} for k, v in per.items()}
    fn = out / "final_norm_term.pt"
    if fn.exists():  # ours minus its decoder.final_norm term: the statistic modelopt computes
        res["hidden"]["without_our_final_norm_term"] = _spearman(mo.hidden, ours.hidden - torch.load(fn))
    overlap = {}
    for name, k in ks.items():  # kept-set overlap with ours at each budget's widths
        top = lambda s, n: set(s.argsort(descending=True)[:n].tolist())
        overlap[name] = {"hidden": len(top(mo.hidden, k["hidden"]) & top(ours.hidden, k["hidden"])) / k["hidden"],
                         "ffn": [len(top(a, k["ffn"]) & top(b, k["ffn"])) / k["ffn"] for a, b in zip(mo.ffn, ours.ffn)]}
    res["kept_overlap_with_ours"] = overlap
    res["depth"]["modelopt_order_cosine"] = mo.layer_order
    res["depth"]["ours_order"] = list(ours.layer_order)
    res["depth"]["ours_metric"] = ours.depth_metric
    if demo_root is not None:
        cos = our_cosine_order(demo_root)
        res["depth"]["ours_cosine_order"] = cos
        res["depth"]["spearman_vs_ours_cosine"] = _spearman(pos(mo.layer_order), pos(cos))
    # ours, cosine metric, when the demo recorded it (same metric as modelopt's)
    return res


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="demo_out", help="the finished demo directory (read only)")
    ap.add_argument("--out", default="ablations_out/m")
    ap.add_argument("--site", default="/tmp/mo_site", help="private directory modelopt 0.46.0 is installed in")
    ap.add_argument("--n-short", type=int, default=256)
    ap.add_argument("--n-long", type=int, default=64)
    ap.add_argument("--steps", default="", help="per-stage steps in place of the family's share (e.g. 20,6)")
    ap.add_argument("--phase", default="all", choices=["all", "prune", "train", "corr"],
                    help="all: prune (subprocess) then distill + evaluate; corr: only the logit check and the "
                         "rank correlations, written into an existing OUT/modelopt_arm.json")
    ap.add_argument("--with-ours", action="store_true",
                    help="also rerun our own arm (a)(iii) prune_distill_share (sorted parent) beside it, same steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.phase == "prune":  # in its own process: modelopt's patches never reach the training
        import_modelopt(args.site)
        prune_phase(args)
        return {}

    from ablations import Demo, share_of_family, slice_eval, train_fixed

    from elastic_megatron.data.tokenizer import load_tokenizer
    from elastic_megatron.demo import standard_error  # noqa: F401  (evaluate_model reports *_se with it)
    from elastic_megatron.elastic.subnet import homogeneous_for_target, subnet_params
    from elastic_megatron.model.hybrid import padded_vocab_size

    demo = Demo(Path(args.demo))
    m = demo.cfg.model
    vocab = padded_vocab_size(m, load_tokenizer(demo.cfg.data.tokenizer).vocab_size, 1)
    homos, paths = {}, {}
    for row in demo.rows()[1:]:
        name = row["name"]
        homos[name] = homogeneous_for_target(m, vocab, row["params"], tp=demo.cfg.parallel.tensor)
        paths[name] = out / f"homogeneous_{name}.json"
        paths[name].write_text(json.dumps({"subnet": homos[name].to_dict()}))
    (out / "homogeneous.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    if args.phase == "all":
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, __file__, "--phase", "prune", "--demo", args.demo, "--out", args.out, "--site", args.site]
        say("prune phase: " + " ".join(cmd))
        rc = subprocess.run(cmd, env=env, check=False).returncode
        if rc:
            raise SystemExit(rc)
    st = json.loads((out / "prune_state.json").read_text())
    check = check_phase(out, Path(args.demo), homos)
    say(f"our subnet of the modelopt-ordered parent vs modelopt's pruned model: {check}")
    corr = correlations(out, demo.cfg.elastic.importance_path,
                        {n: {"hidden": h.hidden, "ffn": h.ffn[0]} for n, h in homos.items()}, Path(args.demo))
    say("Spearman: " + ", ".join(f"{k} {v['mean']:.4f} (min {v['min']:.4f})" for k, v in corr.items() if "mean" in v))
    if args.phase == "corr":
        res = json.loads((out / "modelopt_arm.json").read_text())
        res.update({"spearman": {k: {"mean": v["mean"], "min": v["min"]} for k, v in corr.items() if "mean" in v},
                    "spearman_detail": corr, "logit_check": check, "modelopt_kd": st.get("modelopt_kd")})
        (out / "modelopt_arm.json").write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k not in ("spearman_detail", "patches")}))
        return res
    res: dict = {"modelopt_version": st["modelopt_version"], "route": "modelopt-ordered parent + our homogeneous "
                 "Subnet (== modelopt's pruned model, logits checked), distilled with train_fixed",
                 "budgets": {}, "spearman": {k: {"mean": v["mean"], "min": v["min"]} for k, v in corr.items() if "mean" in v},
                 "spearman_detail": corr, "logit_check": check, "prune_s": {k: v["prune_s"] for k, v in st["budgets"].items()},
                 "patches": st["patches"], "modelopt_kd": st.get("modelopt_kd")}
    for name, homo in homos.items():
        share = [int(x) for x in args.steps.split(",")] if args.steps else share_of_family(demo.cfg, name)
        say(f"budget {name}: distill the modelopt-pruned model, stage steps {share}")
        t1 = time.time()
        ck = train_fixed(demo, out / f"mo_prune_distill_share_{name}", name, str(paths[name]),
                         st["mo_sorted_checkpoint"], share)
        ev = slice_eval(demo.cfg, ck, {name: homo}, out / f"mo_prune_distill_share_{name}" / "model",
                        args.n_short, args.n_long, demo.eval_seed)[name]
        res["budgets"][name] = {"params": ev["params"], "params_check": subnet_params(homo, m, vocab),
                                "accuracy_short": ev["accuracy_short"], "accuracy_short_se": ev["accuracy_short_se"],
                                "accuracy_long": ev["accuracy_long"], "accuracy_long_se": ev["accuracy_long_se"],
                                "heldout_loss": ev["heldout_loss"], "n_short": args.n_short, "n_long": args.n_long,
                                "stage_steps": share, "share_of_family": share_of_family(demo.cfg, name),
                                "architecture": homo.to_dict(), "train_eval_s": round(time.time() - t1, 1)}
        say(f"budget {name}: {res['budgets'][name]}")
        if args.with_ours:  # ablations arm (a)(iii) itself: our sorted parent, same subnet, steps, teacher
            t1 = time.time()
            ck = train_fixed(demo, out / f"ours_prune_distill_share_{name}", name, str(paths[name]), demo.sorted_ckpt, share)
            ev = slice_eval(demo.cfg, ck, {name: homo}, out / f"ours_prune_distill_share_{name}" / "model",
                            args.n_short, args.n_long, demo.eval_seed)[name]
            res.setdefault("ours_rerun", {})[name] = {
                k: ev[k] for k in ("params", "accuracy_short", "accuracy_short_se", "accuracy_long", "accuracy_long_se",
                                   "heldout_loss")} | {"stage_steps": share, "train_eval_s": round(time.time() - t1, 1)}
            say(f"budget {name}: ours rerun {res['ours_rerun'][name]}")
        (out / "modelopt_arm.json").write_text(json.dumps(res, indent=1))
    res["wall_s"] = round(time.time() - t0, 1)
    (out / "modelopt_arm.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("spearman_detail", "patches")}))
    return res


if __name__ == "__main__":
    main()
