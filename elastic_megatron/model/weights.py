"""The one place that knows where a layer's weights live, whatever megatron layer spec built it.

The two specs (model/spec.py) hold the same weights under different modules:

    weight                    local spec                       Transformer Engine spec
    Mamba pre-norm            layer.norm.weight                layer.mixer.in_proj.layer_norm_weight
    attention pre-norm        layer.input_layernorm.weight     layer.self_attention.linear_qkv.layer_norm_weight
    MLP pre-norm              layer.pre_mlp_layernorm.weight   layer.mlp.linear_fc1.layer_norm_weight

(TE fuses the RMSNorm into the next linear; the spec's own norm module is then an IdentityOp.)
Everything else -- projections, conv, A_log, D, dt_bias, the gated norm, the final norm,
embeddings -- has the same name in both. Checkpoints use the TE names (megatron's convention:
its local specs map their norm keys onto TE's with `sharded_state_dict_keys_map`), so a
checkpoint written under either spec loads under the other.
"""

from __future__ import annotations

import torch

# per layer kind: (the local spec's norm module, the linear TE fuses it into)
_PRE_NORM = {"M": ("norm", "mixer.in_proj"), "*": ("input_layernorm", "self_attention.linear_qkv"),
             "-": ("pre_mlp_layernorm", "mlp.linear_fc1")}

# The local spec's checkpoint keys -> the canonical (TE) keys, per layer kind.
CANONICAL_KEYS = {kind: {f"{norm}.": f"{fused}.layer_norm_"} for kind, (norm, fused) in _PRE_NORM.items()}
# Canonical key suffix -> the local name checkpoints used before the canonical keys (still read).
LEGACY_NORM_KEYS = {f"{fused}.layer_norm_weight": f"{norm}.weight" for norm, fused in _PRE_NORM.values()}


def pre_norm_weight(layer: torch.nn.Module, kind: str) -> torch.nn.Parameter:
    """The RMSNorm weight applied to the input of layer `layer` of kind M / * / - ([h])."""
    norm_attr, fused = _PRE_NORM[kind]
    norm = getattr(layer, norm_attr, None)
    weight = getattr(norm, "weight", None)
    if weight is not None:
        return weight
    weight = getattr(layer.get_submodule(fused), "layer_norm_weight", None)
    if weight is None:
        raise AttributeError(f"a '{kind}' layer ({type(layer).__name__}) has neither {norm_attr}.weight nor "
                             f"{fused}.layer_norm_weight; add its layer spec to model/weights.py")
    return weight


def is_pre_norm(rest: str) -> bool:
    """Whether a parameter name inside a layer (`rest`, e.g. "norm.weight" or
    "mixer.in_proj.layer_norm_weight") is that layer's pre-norm, under either spec."""
    return any(rest in (f"{norm}.weight", f"{fused}.layer_norm_weight") for norm, fused in _PRE_NORM.values())
