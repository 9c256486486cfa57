"""`import-hf` and `export-hf`: the first and the last step of a user's real path.

    elastic-megatron import-hf HF_DIR --out RUN_DIR [overrides]
        -> RUN_DIR/{config.yaml, parent/ (dist checkpoint), tokenizer/, hf_source/config.json}
    elastic-megatron export-hf --checkpoint RUN_OR_CKPT --budget 6B --budget 1.0 --out DIR
        -> DIR/budget_<b>/{config.json, model*.safetensors, tokenizer files, generation_config.json,
           README.md[, modeling_nemotron_h_elastic.py]} and DIR/exports.json

Both stream: import reads one HF tensor at a time and keeps only this rank's shard of it; export
gathers one parameter at a time, cuts it for every budget and hands it to a shard writer. Run
either under torchrun with parallel.tensor=N and each rank holds ~1/N of the model (rank 0
writes the export). Dist checkpoints load under any TP x PP layout, so the imported parent
trains at whatever layout the next job uses.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..config import ConfigError, RunConfig, load_config, parse_budget, to_yaml
from ..model.hybrid import build_model, count_parameters
from ..parallel import ParallelLayout, destroy_distributed, init_distributed
from ..train.checkpoint import save_checkpoint
from ..train.loop import run_dtype
from . import hf
from .hf_tokenizer import save_tokenizer, tokenizer_files
from .safetensors_io import HFReader, ShardedWriter

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# -- import --------------------------------------------------------------------------------------

def import_config(hf_dir: str, out_dir: str, config: str | None, overrides: list[str]) -> tuple[RunConfig, bool]:
    """Our RunConfig for a HF NemotronH directory: its sizes as model.* overrides under the user's config
    and overrides; the run directory's parent checkpoint, tokenizer and source config wired in."""
    source = hf.read_hf_config(hf_dir)
    fields, tied = hf.model_config_from_hf(source)
    out = Path(out_dir).resolve()
    wired = [f"logging.out_dir={out}", f"checkpoint.load={out / 'parent'}",
             f"model.hf_source={out / 'hf_source' / 'config.json'}"]
    if tokenizer_files(hf_dir):
        wired.append(f"data.tokenizer={out / 'tokenizer'}")
    return load_config(config, [*hf.model_overrides(fields), *wired, *overrides]), tied


def import_hf_job(hf_dir: str, out_dir: str, config: str | None, overrides: list[str]) -> dict:
    cfg, tied = import_config(hf_dir, out_dir, config, overrides)
    reader = HFReader(hf_dir, tied_embeddings=tied)
    layout = ParallelLayout.resolve(cfg, _world())
    init_distributed(layout, cfg.train.seed)
    try:
        vocab = cfg.model.vocab_size
        model = build_model(cfg, layout, vocab, run_dtype(cfg.train.precision), initialize=False)
        _check_keys(reader, cfg, vocab)
        from ..elastic.slicing import stage_parameters

        tp_rank = ps.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for _, gname, p in stage_parameters(model, cfg, layout):  # one tensor at a time, this rank's rows
                p.copy_(hf.to_megatron_shard(gname, reader, cfg.model, vocab, tp_rank, layout.tensor).to(p.dtype))
        out = Path(cfg.logging.out_dir)
        if _rank0():
            (out / "hf_source").mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "generation_config.json"):
                if (Path(hf_dir) / name).exists():
                    shutil.copy2(Path(hf_dir) / name, out / "hf_source" / name)
            if tokenizer_files(hf_dir):
                save_tokenizer(str(hf_dir), out / "tokenizer")
            (out / "config.yaml").write_text(to_yaml(cfg))
        # not sorted: no FFN layout to record (load_parent lays nothing out)
        ckpt = save_checkpoint(out / "parent", 0, model, None, {"step": 0, "config": to_yaml(cfg)})
        return {"config": str(out / "config.yaml"), "checkpoint": str(ckpt), "tied": tied,
                "params": count_parameters(cfg.model, vocab), "pattern": cfg.model.hybrid_override_pattern}
    finally:
        destroy_distributed()


def _check_keys(reader: HFReader, cfg: RunConfig, vocab: int) -> None:
    """Every tensor the config implies exists, and nothing is left over (a MoE expert, an MTP head, ...)."""
    want: set[str] = {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i, kind in enumerate(cfg.model.hybrid_override_pattern):
        pre = f"backbone.layers.{i}."
        want.add(pre + "norm.weight")
        want |= {pre + x for x in {
            "M": ("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.A_log", "mixer.D",
                  "mixer.dt_bias", "mixer.norm.weight", "mixer.out_proj.weight"),
            "*": ("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight", "mixer.o_proj.weight"),
            "-": ("mixer.up_proj.weight", "mixer.down_proj.weight")}[kind]}
    have = reader.keys() | ({"lm_head.weight"} if reader.tied else set())
    missing, extra = sorted(want - have), sorted(have - want)
    if missing:
        raise ConfigError(f"'{reader.dir}' lacks tensor '{missing[0]}' ({len(missing)} missing) that its config.json "
                          "implies; is the checkpoint complete?")
    if extra:
        raise ConfigError(f"'{reader.dir}' has tensor '{extra[0]}' ({len(extra)} unexpected) that no supported "
                          "layer uses (MoE experts, MTP heads and biases are not supported)")


# -- export --------------------------------------------------------------------------------------

def _export_dtype(cfg: RunConfig, choice: str) -> torch.dtype:
    if choice != "auto":
        if choice not in _DTYPES:
            raise ConfigError(f"--dtype '{choice}': one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[choice]
    if cfg.model.hf_source and Path(cfg.model.hf_source).exists():  # the imported parent's own dtype
        source = json.loads(Path(cfg.model.hf_source).read_text())
        name = source.get("dtype") or source.get("torch_dtype")
        if name in _DTYPES:
            return _DTYPES[name]
    return run_dtype(cfg.train.precision)


def hf_vocab(cfg: RunConfig, tokenizer_vocab: int) -> int:
    """Rows of the exported embeddings: the imported model's own vocabulary, else the tokenizer's."""
    m = cfg.model
    return m.unpadded_vocab_size or m.vocab_size or tokenizer_vocab


def export_hf_job(cfg: RunConfig, budgets: list[str], out_dir: str, router_path: str = "", dtype: str = "auto",
                  max_shard_bytes: int = 5 * 2**30) -> list[dict]:
    """Write one HF directory per budget from the (sorted or elastic) parent in `checkpoint.load`."""
    from ..elastic.jobs import _parent, choose_family
    from ..elastic.slicing import gather_full_tensor, slice_tensor, sliced_model_config, stage_parameters
    from ..elastic.subnet import subnet_params

    for b in budgets:
        parse_budget(b)
    if not cfg.checkpoint.load:
        raise ConfigError("config key 'checkpoint.load': export-hf needs a parent (give --checkpoint or checkpoint.load)")
    if cfg.parallel.pipeline != 1:
        raise ConfigError("config key 'parallel.pipeline': export-hf runs with pipeline=1 (use parallel.tensor=N "
                          "to spread the parent over N processes)")
    torch_dtype = _export_dtype(cfg, dtype)
    layout, tok, vocab, parent, loop = _parent(cfg, _world())
    try:
        family = choose_family(cfg, loop, vocab, budgets, router_path)
        # a sorted parent is laid out for this run's TP; an unsorted one is in its natural order
        sort_tp = layout.tensor if (loop.get("ffn_layout_tp") or cfg.elastic.sort_tensor_parallel) else 1
        n_vocab = hf_vocab(cfg, tok.vocab_size)
        jobs = []
        for text, (subnet, target) in family.items():
            small = sliced_model_config(cfg.model, subnet)
            path = Path(out_dir) / ("budget_" + text.replace(".", "p"))
            jobs.append({"budget": text, "subnet": subnet, "target": target, "model": small, "path": path,
                         "elastic": small.heterogeneous, "exported": 0})
        if _rank0():
            for j in jobs:
                shutil.rmtree(j["path"], ignore_errors=True)
                j["path"].mkdir(parents=True)
                j["writer"] = ShardedWriter(j["path"], max_shard_bytes)
        for _, gname, p in stage_parameters(parent, cfg, layout):
            full = gather_full_tensor(gname, p, cfg, layout)  # a collective: every rank takes part
            if not _rank0():
                continue
            for j in jobs:
                cut = slice_tensor(gname, full, cfg.model, j["subnet"], sort_tp)
                if cut is None:
                    continue
                for key, t in hf.to_hf(cut[0], cut[1], j["model"], n_vocab).items():
                    j["writer"].add(hf.file_key(key, j["elastic"]), t.to(torch_dtype).contiguous())
                    j["exported"] += t.numel()
            del full
        rows = []
        if _rank0():
            source = json.loads(Path(cfg.model.hf_source).read_text()) if cfg.model.hf_source and \
                Path(cfg.model.hf_source).exists() else None
            for j in jobs:
                files = j.pop("writer").close()
                ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
                rows.append(_finish(j, cfg, source, ids, n_vocab, vocab, torch_dtype, files,
                                    subnet_params(j["subnet"], cfg.model, vocab)))
            Path(out_dir, "exports.json").write_text(json.dumps(rows, indent=1))
        return rows
    finally:
        destroy_distributed()


def _finish(j: dict, cfg: RunConfig, source: dict | None, ids: dict, n_vocab: int, padded_vocab: int,
            dtype: torch.dtype, files: list[str], params: int) -> dict:
    path, m = j["path"], j["model"]
    dtype_name = {v: k for k, v in _DTYPES.items()}[dtype]
    config = hf.hf_config(m, n_vocab, source, dtype_name, j["elastic"], ids)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen = Path(cfg.model.hf_source).parent / "generation_config.json" if cfg.model.hf_source else None
    if gen is not None and gen.exists():
        shutil.copy2(gen, path / "generation_config.json")
    else:
        (path / "generation_config.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} | {"do_sample": False}, indent=2))
    tokenizer = save_tokenizer(cfg.data.tokenizer, path)
    if j["elastic"]:
        shutil.copy2(Path(__file__).with_name("nemotron_h_elastic.py"), path / "modeling_nemotron_h_elastic.py")
    row = {"budget": j["budget"], "target": j["target"], "params": params, "exported_params": j["exported"],
           "pattern": m.hybrid_override_pattern, "format": "nemotron_h_elastic (trust_remote_code)" if j["elastic"]
           else "nemotron_h (stock transformers)", "dtype": dtype_name, "files": files, "tokenizer": tokenizer,
           "source": str(cfg.checkpoint.load), "subnet": j["subnet"].to_dict(), "path": str(path)}
    (path / "README.md").write_text(_readme(row, padded_vocab - n_vocab, m.hidden_size))
    return row


def _readme(row: dict, vocab_trimmed: int, hidden: int) -> str:
    s = row["subnet"]
    remote = "elastic" in row["format"]  # per-layer widths: modeling_nemotron_h_elastic.py
    load = "AutoModelForCausalLM.from_pretrained(path" + (", trust_remote_code=True)" if remote else ")")
    load_tok = "AutoTokenizer.from_pretrained(path" + (", trust_remote_code=True)" if remote else ")")
    heterogeneous = ("\n- per-layer widths (`layer_sizes` in config.json), so this directory ships its modelling code "
                     "(`modeling_nemotron_h_elastic.py`: stock transformers NemotronH layers, each built from its own "
                     "sizes); vLLM's NemotronH does not take per-layer Mamba sizes" if remote else "")
    trim = (f" The {vocab_trimmed} padding rows of each embedding ({2 * vocab_trimmed * hidden:,} parameters) "
            "are not exported." if vocab_trimmed else "")
    return f"""# elastic-megatron export: budget {row['budget']}

Cut zero-shot (no further training) from `{row['source']}` by elastic-megatron.

- format: {row['format']}, {row['dtype']}
- layer pattern (M = Mamba-2, * = attention, - = MLP): `{row['pattern']}`{heterogeneous}
- parameters: {row['params']:,} in the subnet, {row['exported_params']:,} exported (target {row['target']:,.0f}).{trim}
- subnet: hidden {s['hidden']}; Mamba heads {s['mamba_heads']}; Mamba head dim {s['mamba_head_dim']};
  attention heads {s['attn_heads']}; FFN {s['ffn']}; layers kept {sum(s['keep'])} of {len(s['keep'])}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = {load}
tok = {load_tok}
```
"""


def resolve_export_config(config: str | None, checkpoint: str, overrides: list[str]) -> RunConfig:
    """The config export-hf / generate run with: the checkpoint's own (see checkpoint_config) when
    `--checkpoint` is given, else `--config`; `checkpoint.load` points at the checkpoint."""
    from ..train.checkpoint import checkpoint_config

    from ..train.checkpoint import resolve_checkpoint

    if not checkpoint:
        return load_config(config, overrides)
    cfg = checkpoint_config(checkpoint, overrides) if not config else load_config(config, overrides)
    ckpt = resolve_checkpoint(checkpoint)
    # a run directory without checkpoints/ of its own (import-hf's): its config names the parent
    load = str(ckpt) if (ckpt / "metadata.json").exists() else cfg.checkpoint.load
    return replace(cfg, checkpoint=replace(cfg.checkpoint, load=load))
