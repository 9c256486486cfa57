"""Hugging Face in and out: import-hf, export-hf and generate against stock transformers (fp32, CPU).

- a tiny random NemotronH built by transformers -> import-hf -> our logits == transformers' (TP=1
  here; TP=2 in tests/distributed/test_hf_tp.py);
- HF -> ours -> export-hf of the full model gives back the original tensors exactly;
- export-hf of a homogeneous and of a heterogeneous budget: transformers' logits == our sliced
  model's, and greedy generations are identical (our cut-at-load `generate` vs transformers');
- unsupported configs and broken directories end in one line naming the field / file.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from elastic_megatron.cli import main  # noqa: E402
from elastic_megatron.config import load_config, to_yaml  # noqa: E402
from elastic_megatron.formats.hf_jobs import export_hf_job, import_hf_job, resolve_export_config  # noqa: E402
from elastic_megatron.formats.hf_tokenizer import save_tokenizer  # noqa: E402

FAST = ["logging.wandb_mode=disabled", "logging.progress=false", "model.backend=local"]
TYPES = ["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "mlp"]


def make_hf_parent(out: Path, **overrides) -> dict:
    """A tiny random NemotronH saved by transformers in shards, with non-trivial norms, D and conv bias
    (all-ones norms would hide a norm mix-up), plus reference logits."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=64, layers_block_type=TYPES, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
              chunk_size=16, time_step_min=1e-9, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
    kw.update(overrides)
    model = NemotronHForCausalLM(NemotronHConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            if name.endswith((".D", "conv1d.bias")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(out), max_shard_size="100KB")  # several shards + an index
    save_tokenizer("char", out)
    x = torch.randint(3, 57, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return {"x": x, "logits": model(x).logits}


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(str(directory / "*.safetensors"))):
        out.update(load_file(f))
    return out


def our_logits(run: Path, x: torch.Tensor) -> torch.Tensor:
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed
    from elastic_megatron.train.checkpoint import load_checkpoint, resolve_checkpoint

    cfg = load_config(str(run / "config.yaml"), ["model.backend=local"])
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, 0)
    try:
        model = build_model(cfg, layout, cfg.model.vocab_size, torch.float32).eval()
        load_checkpoint(resolve_checkpoint(cfg.checkpoint.load), model)
        with torch.no_grad():
            return model(x, torch.arange(x.shape[1]).expand_as(x), None)
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    ref = make_hf_parent(root / "src")
    result = import_hf_job(str(root / "src"), str(root / "run"), None, FAST)
    return root, ref, result


def test_import_matches_transformers(imported):
    root, ref, result = imported
    run = root / "run"
    assert (run / "config.yaml").exists() and (run / "tokenizer" / "tokenizer.json").exists()
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.model.hybrid_override_pattern == "M-*-M-" and cfg.model.vocab_size == 128
    assert cfg.data.tokenizer == str(run / "tokenizer") and cfg.checkpoint.load == str(run / "parent")
    got = our_logits(run, ref["x"])
    diff = (got[..., :128] - ref["logits"]).abs().max().item()
    assert diff <= 1e-4, diff
    assert ref["logits"].abs().max() > 0.1  # a real comparison
    n_hf = sum(t.numel() for t in hf_tensors(root / "src").values())
    assert result["params"] == n_hf


def test_roundtrip_gives_back_the_original_tensors(imported):
    root, _, _ = imported
    cfg = resolve_export_config(None, str(root / "run"), FAST)
    rows = export_hf_job(cfg, ["1.0"], str(root / "exp"))
    assert rows[0]["format"].startswith("nemotron_h ") and rows[0]["exported_params"] == rows[0]["params"]
    src, out = hf_tensors(root / "src"), hf_tensors(root / "exp" / "budget_1p0")
    assert set(src) == set(out)
    for k in src:
        assert src[k].dtype == out[k].dtype and torch.equal(src[k], out[k]), k
    exported = json.loads((root / "exp" / "budget_1p0" / "config.json").read_text())
    original = json.loads((root / "src" / "config.json").read_text())
    for key in ("hidden_size", "layers_block_type", "mamba_num_heads", "n_groups", "head_dim", "vocab_size",
                "intermediate_size", "bos_token_id", "eos_token_id"):
        assert exported[key] == original[key], key


# A heterogeneous subnet of the tiny parent (pattern M-M*-M-M*-): per-layer Mamba heads and head dims,
# FFN widths and attention heads, two dropped layers.
HETERO = {"hidden": 144, "mamba_heads": [16, 8, 12, 8], "mamba_head_dim": [24, 12, 18, 24], "attn_heads": [8, 4],
          "ffn": [576, 384, 768, 192], "keep": [True, True, True, True, False, True, True, True, True, False]}


@pytest.fixture(scope="module")
def own_parent(tmp_path_factory):
    """Our own tiny (char-tokenizer) parent, randomly initialised and saved with its config."""
    from elastic_megatron.data.tokenizer import load_tokenizer
    from elastic_megatron.model.hybrid import build_model, padded_vocab_size
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed
    from elastic_megatron.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("own")
    (root / "hetero.json").write_text(json.dumps(HETERO))
    # the full model, a homogeneous and a heterogeneous budget, hand-picked (no router to fit)
    budgets = ["budgets=['1.0','0.6','0.4']",
               f"subnets=['','hidden=0.75,mamba_heads=0.5,ffn=0.5','{root / 'hetero.json'}']"]
    cfg = load_config(None, [*FAST, f"logging.out_dir={root}", *("elastic." + b for b in budgets)])
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, 0)
    try:
        vocab = padded_vocab_size(cfg.model, load_tokenizer("char").vocab_size, 1)
        model = build_model(cfg, layout, vocab, torch.float32)
        save_checkpoint(root / "checkpoints", 0, model, None, {"step": 0, "config": to_yaml(cfg)})
    finally:
        destroy_distributed()
    return root


def test_export_budgets_match_our_sliced_models(own_parent, tmp_path):
    from elastic_megatron.generate import cut_budget, generate_elastic, generate_hf
    from elastic_megatron.parallel import destroy_distributed

    cfg = resolve_export_config(None, str(own_parent), FAST)
    assert cfg.elastic.budgets == ["1.0", "0.6", "0.4"]  # read from the checkpoint, no flags
    rows = {r["budget"]: r for r in export_hf_job(cfg, [], str(tmp_path))}
    hom, het = "0.6", "0.4"
    assert rows["1.0"]["format"].startswith("nemotron_h ") and rows[hom]["format"].startswith("nemotron_h ")
    assert rows[het]["format"].startswith("nemotron_h_elastic")
    assert (tmp_path / "budget_0p4" / "modeling_nemotron_h_elastic.py").exists()
    assert not (tmp_path / "budget_0p6" / "modeling_nemotron_h_elastic.py").exists()
    prompts = ["q: 12+7 =", "(3*4)-5 ="]
    x = torch.randint(4, 57, (2, 33), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(33).expand_as(x)
    for name, row in ((b, rows[b]) for b in (hom, het)):  # the full model: test_roundtrip's stock path
        path = tmp_path / f"budget_{name.replace('.', 'p')}"
        assert row["exported_params"] == row["params"] - 2 * (64 - 57) * row["subnet"]["hidden"]  # vocab trimmed
        config = json.loads((path / "config.json").read_text())
        assert config["vocab_size"] == 57 and ("layer_sizes" in config) == (name == het)
        kwargs = {"trust_remote_code": True} if name == het else {}
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()
        assert sum(p.numel() for p in hf_model.parameters()) == row["exported_params"]
        loaded = {k.replace("backbone.", "model.", 1): v for k, v in hf_model.state_dict().items()}
        for key, t in hf_tensors(path).items():  # every tensor really loaded (none left at its init)
            assert torch.equal(loaded[key.replace("backbone.", "model.", 1)], t), (name, key)
        try:
            small, _, _, _, subnet = cut_budget(cfg, name)
            with torch.no_grad():
                ours = small(x, pos, None)[..., :57]
        finally:
            destroy_distributed()
        with torch.no_grad():
            theirs = hf_model(x).logits
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-4 and theirs.abs().max() > 0.1, (name, diff)
        ours_ids = generate_elastic(cfg, name, prompts, max_new=10, ids=True)
        theirs_ids = generate_hf(str(path), prompts, max_new=10, ids=True)
        assert ours_ids == theirs_ids, (name, ours_ids, theirs_ids)
        assert all(len(g) > 0 for g in ours_ids)  # something was generated
    # nested inside the homogeneous budget, and still per-layer in every way stock NemotronH cannot say
    het_subnet = rows[het]["subnet"]
    assert len(set(het_subnet["mamba_head_dim"])) > 1 and len(set(het_subnet["ffn"])) > 1
    assert not all(het_subnet["keep"]) and rows[hom]["subnet"]["hidden"] == 144


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("field,value,message", [
    ("layers_block_type", ["linear_attention", "moe", "mlp"], "MoE"),
    ("mlp_hidden_act", "silu", "mlp_hidden_act"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon"),
    ("model_type", "llama", "model_type"),
])
def test_unsupported_config_is_one_line(tmp_path, capsys, field, value, message):
    src = tmp_path / "src"
    src.mkdir()
    config = {"model_type": "nemotron_h", "vocab_size": 128, "hidden_size": 64, "layers_block_type": TYPES,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
              "mamba_num_heads": 8, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 16, field: value}
    (src / "config.json").write_text(json.dumps(config))
    err = _one_line_error(capsys, ["import-hf", str(src), "--out", str(tmp_path / "run"), *FAST])
    assert message in err and f"'{field}'" in err, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_broken_hf_directory_is_one_line(imported, tmp_path, capsys):
    root, _, _ = imported
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((root / "src" / "config.json").read_text())
    err = _one_line_error(capsys, ["import-hf", str(src), "--out", str(tmp_path / "run"), *FAST])
    assert "model.safetensors" in err
    err = _one_line_error(capsys, ["import-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run2")])
    assert "not a directory" in err


def test_partial_reads_equal_the_sharded_full_tensor(imported):
    """import-hf reads only a rank's rows / columns of each HF tensor: the same as cutting the full one."""
    from elastic_megatron.formats import hf
    from elastic_megatron.formats.safetensors_io import HFReader
    from elastic_megatron.model import sharding
    from elastic_megatron.model.hybrid import build_model  # noqa: F401  (megatron imported as in a job)

    root, _, _ = imported
    cfg = load_config(str(root / "run" / "config.yaml"))
    reader = HFReader(root / "src")
    names = ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_norm.weight"]
    for i, kind in enumerate(cfg.model.hybrid_override_pattern):
        pre = f"decoder.layers.{i}."
        names += {"M": [pre + "mixer.in_proj.layer_norm_weight", *(pre + x for x in hf._SAME)],
                  "*": [pre + "self_attention.linear_qkv.layer_norm_weight", pre + hf._QKV,
                        pre + "self_attention.linear_proj.weight"],
                  "-": [pre + "mlp.linear_fc1.layer_norm_weight", pre + "mlp.linear_fc1.weight",
                        pre + "mlp.linear_fc2.weight"]}[kind]
    for name in names:
        full = hf.to_megatron(name, reader.get, cfg.model, 128)
        for rank in range(2):
            want = sharding.shard(name, full, rank, 2, cfg.model)
            got = hf.to_megatron_shard(name, reader, cfg.model, 128, rank, 2)
            assert got.shape == want.shape and torch.equal(got, want), (name, rank)
