"""Hugging Face NemotronH <-> our megatron model: the config mapping and the tensor mapping.

Everything here works on *full* (TP=1) tensors keyed by global megatron names; model/sharding.py
cuts them for a TP rank and glues them back. One megatron parameter maps to one or more HF tensors:

    megatron (global name)                          HF (`backbone.` prefix in files)
    embedding.word_embeddings.weight [Vp, h]        embeddings.weight [V, h]      (V <= Vp: TP padding)
    decoder.layers.i.<pre-norm>      [h]            layers.i.norm.weight          (either layer spec)
    decoder.layers.i.mixer.in_proj   [2d+2GN+H, h]  layers.i.mixer.in_proj        ([z | x | B | C | dt] in both)
    decoder.layers.i.mixer.{conv1d, A_log, D, dt_bias, norm, out_proj}  the same names
    decoder.layers.i.self_attention.linear_qkv      layers.i.mixer.{q,k,v}_proj   (per KV group [q..q, k, v])
    decoder.layers.i.self_attention.linear_proj     layers.i.mixer.o_proj
    decoder.layers.i.mlp.linear_fc{1,2}             layers.i.mixer.{up,down}_proj
    decoder.final_norm.weight, output_layer.weight  norm_f.weight, lm_head.weight (no prefix)

What the two implementations compute differently, and how it is handled:
- megatron's gated Mamba norm hard-codes eps 1e-5, HF's uses `layer_norm_epsilon` for every norm:
  only 1e-5 is accepted.
- HF clamps dt from below at `time_step_min`; megatron does not clamp. Exports write a tiny
  `time_step_min` (EXPORT_TIME_STEP_MIN) so the clamp never binds and the function is megatron's.
- Per-layer widths (a heterogeneous subnet) do not fit the stock config's scalar sizes: those
  exports carry `layer_sizes` and ship formats/nemotron_h_elastic.py as their modelling code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError, ModelConfig
from ..model import sharding
from ..model.weights import is_pre_norm

HF_LAYER_TYPES = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
PATTERN_TO_TYPE = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
ELASTIC_MODEL_TYPE = "nemotron_h_elastic"
EXPORT_TIME_STEP_MIN = 1e-9  # dt = softplus(.) never gets this small: HF's clamp then never binds
VOCAB_MULTIPLE = 128  # imported vocabularies are padded to this, so every TP size up to 128 divides them


def _field(key: str, msg: str) -> ConfigError:
    return ConfigError(f"Hugging Face config field '{key}': {msg}")


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f"'{hf_dir}' is not a directory; give a Hugging Face model directory "
                                "(config.json + *.safetensors)")
    if not path.exists():
        raise FileNotFoundError(f"'{hf_dir}' has no config.json; give a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"'{path}' is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _pattern(hf: dict) -> str:
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types:
        unknown = [t for t in types if t not in HF_LAYER_TYPES]
        if unknown:
            raise _field("layers_block_type", f"unknown layer type '{unknown[0]}'")
        pattern = "".join(HF_LAYER_TYPES[t] for t in types)
        key = "layers_block_type"
    else:
        pattern, key = hf.get("hybrid_override_pattern", ""), "hybrid_override_pattern"
        if not pattern:
            raise _field("layers_block_type", "missing (neither layers_block_type nor hybrid_override_pattern given)")
    if "E" in pattern:
        raise _field(key, f"has {pattern.count('E')} MoE layers; elastic-megatron supports Mamba, attention "
                          "and MLP layers only")
    if not re.fullmatch(r"[M*\-]+", pattern):
        raise _field(key, f"'{pattern}' has layer types other than M, *, -")
    return pattern


# (field, required value, why): what our megatron model is; anything else is one clear line.
_REQUIRED = [
    ("mlp_hidden_act", "relu2", "the MLPs are squared ReLU"),
    ("mamba_hidden_act", "silu", "the Mamba conv activation is SiLU"),
    ("use_bias", False, "the linears have no bias"),
    ("mlp_bias", False, "the MLPs have no bias"),
    ("attention_bias", False, "attention has no bias"),
    ("mamba_proj_bias", False, "the Mamba projections have no bias"),
    ("use_conv_bias", True, "megatron's Mamba conv has a bias"),
    ("conv_kernel", 4, "megatron's Mamba conv is 4 wide"),
    ("layer_norm_epsilon", 1e-5, "megatron's gated Mamba norm hard-codes eps 1e-5"),
    ("sliding_window", None, "attention is full (no sliding window)"),
    ("num_nextn_predict_layers", 0, "multi-token-prediction layers are not supported"),
]


def model_config_from_hf(hf: dict) -> tuple[dict, bool]:
    """HF config.json -> ({our model.* field: value}, tied embeddings). Raises ConfigError naming the
    first HF field we do not support."""
    mt = hf.get("model_type")
    if mt not in ("nemotron_h", ELASTIC_MODEL_TYPE):
        raise _field("model_type", f"'{mt}' is not a NemotronH model (want nemotron_h)")
    pattern = _pattern(hf)
    for key, want, why in _REQUIRED:
        got = hf.get(key, want)
        if got != want and not (isinstance(want, float) and isinstance(got, (int, float)) and abs(got - want) < 1e-12):
            raise _field(key, f"{got!r} is not supported ({why}; want {want!r})")
    try:
        vocab = int(hf["vocab_size"])
        fields = {
            "hybrid_override_pattern": pattern,
            "hidden_size": int(hf["hidden_size"]),
            "ffn_hidden_size": int(hf["intermediate_size"]),
            "num_attention_heads": int(hf["num_attention_heads"]),
            "num_query_groups": int(hf["num_key_value_heads"]),
            "kv_channels": int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
            "mamba_num_heads": int(hf["mamba_num_heads"]),
            "mamba_head_dim": int(hf["mamba_head_dim"]),
            "mamba_num_groups": int(hf.get("n_groups", hf.get("mamba_n_groups", 8))),
            "mamba_state_dim": int(hf["ssm_state_size"]),
            "norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
            "init_method_std": float(hf.get("initializer_range", 0.02)),
            "max_sequence_length": int(hf.get("max_position_embeddings", 4096)),
        }
    except KeyError as exc:
        raise _field(exc.args[0], "missing") from None
    padded = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    fields["vocab_size"] = padded
    fields["unpadded_vocab_size"] = vocab if padded != vocab else 0
    fields.update(_layer_lists(hf.get("layer_sizes"), pattern))
    return fields, bool(hf.get("tie_word_embeddings", False))


_LIST_FIELDS = {"layer_ffn_hidden_sizes": ("-", "intermediate_size"), "layer_mamba_num_heads": ("M", "mamba_num_heads"),
                "layer_mamba_head_dims": ("M", "mamba_head_dim"), "layer_num_attention_heads": ("*", "num_attention_heads")}


def _layer_lists(layer_sizes, pattern: str) -> dict:
    """Our per-layer width lists from an elastic export's `layer_sizes` (one dict per layer)."""
    if not layer_sizes:
        return {}
    if len(layer_sizes) != len(pattern):
        raise _field("layer_sizes", f"has {len(layer_sizes)} entries for {len(pattern)} layers")
    return {ours: [int(layer_sizes[i][theirs]) for i, c in enumerate(pattern) if c == kind]
            for ours, (kind, theirs) in _LIST_FIELDS.items()}


def model_overrides(fields: dict) -> list[str]:
    """Dotted `model.*` overrides that put the imported sizes into a config."""
    out = []
    for key, value in fields.items():
        text = "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)
        out.append(f"model.{key}={text}")
    return out


def hf_config(m: ModelConfig, vocab: int, source: dict | None, dtype: str, elastic: bool,
              token_ids: dict | None = None) -> dict:
    """config.json for model `m` (sliced or not) with `vocab` real tokens. `source`: the imported
    parent's config.json, whose other fields (token ids, chunk size, ...) are kept; `token_ids`:
    bos / eos / pad ids where the source gives none (the run's tokenizer's)."""
    base = {k: v for k, v in (source or {}).items() if k not in ("architectures", "auto_map", "layer_sizes",
                                                                   "hybrid_override_pattern", "_name_or_path")}
    p = m.hybrid_override_pattern
    per = [m.for_layer(i) for i in range(len(p))]
    cfg = {
        **base,
        "model_type": ELASTIC_MODEL_TYPE if elastic else "nemotron_h",
        "architectures": ["NemotronHElasticForCausalLM" if elastic else "NemotronHForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": m.hidden_size,
        "layers_block_type": [PATTERN_TO_TYPE[c] for c in p],
        "num_hidden_layers": len(p),
        "intermediate_size": max((x.ffn_hidden_size for x, c in zip(per, p) if c == "-"), default=m.ffn_hidden_size),
        "num_attention_heads": max((x.num_attention_heads for x, c in zip(per, p) if c == "*"),
                                   default=m.num_attention_heads),
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.kv_channels,
        "mamba_num_heads": max((x.mamba_num_heads for x, c in zip(per, p) if c == "M"), default=m.mamba_num_heads),
        "mamba_head_dim": max((x.mamba_head_dim for x, c in zip(per, p) if c == "M"), default=m.mamba_head_dim),
        "n_groups": m.mamba_num_groups,
        "ssm_state_size": m.mamba_state_dim,
        "conv_kernel": 4,
        "layer_norm_epsilon": m.norm_epsilon,
        "mlp_hidden_act": "relu2",
        "mamba_hidden_act": "silu",
        "use_bias": False,
        "mlp_bias": False,
        "attention_bias": False,
        "use_conv_bias": True,
        "tie_word_embeddings": False,
        "time_step_min": EXPORT_TIME_STEP_MIN,
        "initializer_range": m.init_method_std,
        "max_position_embeddings": m.max_sequence_length,
        "num_nextn_predict_layers": 0,
        "dtype": dtype,
    }
    for key, value in (token_ids or {}).items():
        cfg.setdefault(key, value)
    if elastic:
        cfg["layer_sizes"] = [{"intermediate_size": x.ffn_hidden_size, "mamba_num_heads": x.mamba_num_heads,
                               "mamba_head_dim": x.mamba_head_dim, "num_attention_heads": x.num_attention_heads}
                              for x in per]
        cfg["auto_map"] = {"AutoConfig": "modeling_nemotron_h_elastic.NemotronHElasticConfig",
                           "AutoModelForCausalLM": "modeling_nemotron_h_elastic.NemotronHElasticForCausalLM"}
    return cfg


# -- tensors -------------------------------------------------------------------------------------

_TOP = {"embedding.word_embeddings.weight": "backbone.embeddings.weight", "decoder.final_norm.weight":
        "backbone.norm_f.weight", "output_layer.weight": "lm_head.weight"}
_SAME = ("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.A_log", "mixer.D",
         "mixer.dt_bias", "mixer.norm.weight", "mixer.out_proj.weight")
_RENAMED = {"self_attention.linear_proj.weight": "mixer.o_proj.weight", "mlp.linear_fc1.weight": "mixer.up_proj.weight",
            "mlp.linear_fc2.weight": "mixer.down_proj.weight"}
_QKV = "self_attention.linear_qkv.weight"


def _split(name: str) -> tuple[int, str] | None:
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
    return (int(match.group(1)), match.group(2)) if match else None


def hf_keys(name: str) -> list[str]:
    """The HF tensors (backbone.* keys) that megatron parameter `name` (global) is made of."""
    if name in _TOP:
        return [_TOP[name]]
    where = _split(name)
    if where is None:
        raise KeyError(f"no Hugging Face name for parameter '{name}'; add it to formats/hf.py")
    i, rest = where
    pre = f"backbone.layers.{i}."
    if is_pre_norm(rest):
        return [pre + "norm.weight"]
    if rest in _SAME:
        return [pre + rest]
    if rest in _RENAMED:
        return [pre + _RENAMED[rest]]
    if rest == _QKV:
        return [pre + f"mixer.{x}_proj.weight" for x in "qkv"]
    raise KeyError(f"no Hugging Face name for parameter '{name}'; add it to formats/hf.py")


def file_key(key: str, elastic: bool) -> str:
    """How a tensor is named in the safetensors files: stock NemotronH files say `backbone.` (transformers
    renames it to `model.` on load for model_type nemotron_h only); the elastic modelling code has no
    such rename, so its files use the in-memory `model.` names."""
    return "model." + key[len("backbone."):] if elastic and key.startswith("backbone.") else key


def _qkv_geometry(name: str, m: ModelConfig) -> tuple[int, int, int]:
    lm = m.for_layer(_split(name)[0])
    g = m.num_query_groups
    return g, lm.num_attention_heads // g, m.kv_channels


def to_megatron(name: str, get: Callable[[str], torch.Tensor], m: ModelConfig, padded_vocab: int) -> torch.Tensor:
    """The full megatron tensor of parameter `name`, built from HF tensors fetched one at a time by `get`."""
    keys = hf_keys(name)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        t = get(keys[0])
        if t.shape[0] > padded_vocab:
            raise ConfigError(f"'{keys[0]}' has {t.shape[0]} rows but model.vocab_size is {padded_vocab}")
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])]) if t.shape[0] < padded_vocab else t
    if len(keys) == 3:  # q [G*hpg*d, h], k, v [G*d, h] -> per group [q_0 .. q_hpg-1, k, v]
        g, hpg, d = _qkv_geometry(name, m)
        q, k, v = (get(key) for key in keys)
        h = q.shape[1]
        return torch.cat([q.view(g, hpg, d, h), k.view(g, 1, d, h), v.view(g, 1, d, h)], dim=1).reshape(-1, h)
    return get(keys[0])


def to_megatron_shard(name: str, reader, m: ModelConfig, padded_vocab: int, rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of parameter `name`, reading only the rows / columns of the HF tensors it
    needs (`reader.get(key, rows=, cols=)`): equal to sharding.shard(to_megatron(...)), without
    ever holding (or touching the file pages of) the full tensor."""
    rule = sharding.split_rule(name)
    if rule is None or tp == 1:
        return sharding.shard(name, to_megatron(name, reader.get, m, padded_vocab), rank, tp, m)
    keys, lm = hf_keys(name), sharding.layer_config(name, m)
    kind, arg = rule
    if kind == "blocks":  # in_proj [z | x | B | C | dt] / conv1d [x | B | C]: rank r's rows of every block
        sizes, start, parts = sharding.blocks(arg, lm), 0, []
        for n in sizes:
            parts.append(reader.get(keys[0], rows=(start + rank * n // tp, start + (rank + 1) * n // tp)))
            start += n
        return torch.cat(parts)
    if arg == 1:  # out_proj, o_proj, down_proj: a column range
        n = reader.shape(keys[0])[1]
        return reader.get(keys[0], cols=(rank * n // tp, (rank + 1) * n // tp))
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        lo, hi = rank * padded_vocab // tp, (rank + 1) * padded_vocab // tp
        real = reader.shape(keys[0])[0]
        t = reader.get(keys[0], rows=(min(lo, real), min(hi, real)))
        return torch.cat([t, t.new_zeros(hi - lo - t.shape[0], t.shape[1])]) if t.shape[0] < hi - lo else t
    if len(keys) == 3:  # whole KV groups per rank: their query heads, their k and v
        g, hpg, d = _qkv_geometry(name, m)
        g0, g1 = rank * g // tp, (rank + 1) * g // tp
        q = reader.get(keys[0], rows=(g0 * hpg * d, g1 * hpg * d))
        k, v = (reader.get(key, rows=(g0 * d, g1 * d)) for key in keys[1:])
        h = q.shape[1]
        return torch.cat([q.view(-1, hpg, d, h), k.view(-1, 1, d, h), v.view(-1, 1, d, h)], dim=1).reshape(-1, h)
    n = reader.shape(keys[0])[0]
    return reader.get(keys[0], rows=(rank * n // tp, (rank + 1) * n // tp))


def to_hf(name: str, t: torch.Tensor, m: ModelConfig, vocab: int) -> dict[str, torch.Tensor]:
    """Full megatron tensor of parameter `name` -> {HF key: tensor} (vocab padding trimmed to `vocab`)."""
    keys = hf_keys(name)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return {keys[0]: t[:vocab]}
    if len(keys) == 3:
        g, hpg, d = _qkv_geometry(name, m)
        per = t.view(g, hpg + 2, d, t.shape[1])
        return {keys[0]: per[:, :hpg].reshape(-1, t.shape[1]), keys[1]: per[:, hpg].reshape(-1, t.shape[1]),
                keys[2]: per[:, hpg + 1].reshape(-1, t.shape[1])}
    return {keys[0]: t}
