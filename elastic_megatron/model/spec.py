"""Layer specs for the hybrid Mamba-Attention stack, one per backend.

megatron-core builds MambaModel from a `ModuleSpec` tree that names the class of every sub-module.
0.16.1 ships only a Transformer Engine spec (`mamba_stack_spec`, norms fused into TE linears).
`local_stack_spec` is the same structure from megatron's own layers — separate RMSNorm modules,
`ColumnParallelLinear` / `RowParallelLinear`, `DotProductAttention`, torch's RMSNorm
(model/norm.py, which also takes sequence parallelism) — so it runs anywhere,
including CPU. The two are numerically the same model; their parameter names differ only where
TE fuses the pre-norm into the following linear (`layer_norm_weight`). The local spec writes its
norms under TE's checkpoint keys (`sharded_state_dict_keys_map`, model/weights.py), so checkpoints
move between the two.
"""

from __future__ import annotations

from .. import compat

compat.install()  # megatron's Mamba modules import triton / mamba-ssm at module top

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .norm import LocalRMSNorm
from .weights import CANONICAL_KEYS


def local_stack_spec() -> ModuleSpec:
    """MambaStack from megatron's local (non-TE) layers. Norms are separate pre-norm modules."""
    return ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=LocalRMSNorm,
                    mixer=ModuleSpec(
                        module=MambaMixer,
                        submodules=MambaMixerSubmodules(
                            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear
                        ),
                    ),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=CANONICAL_KEYS["M"],
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=LocalRMSNorm,
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=ColumnParallelLinear,
                            core_attention=DotProductAttention,
                            linear_proj=RowParallelLinear,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=CANONICAL_KEYS["*"],
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=LocalRMSNorm,
                    mlp=ModuleSpec(
                        module=MLP,
                        submodules=MLPSubmodules(
                            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                        ),
                    ),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=CANONICAL_KEYS["-"],
                ),
            ),
        ),
    )


def te_stack_spec() -> ModuleSpec:
    """megatron's own Transformer Engine spec (GPU with transformer-engine installed)."""
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

    return mamba_stack_spec


def resolve_backend(requested: str) -> str:
    """The ladder's rung for config key model.backend (te, triton or torch; compat/backends.py).

    Also points megatron's Mamba mixer at that rung's kernels and prints the choice once.
    """
    return compat.select_backend(requested)


def stack_spec(backend: str) -> ModuleSpec:
    """te -> megatron's TE spec; triton / torch (and the older name local) -> the local spec."""
    return te_stack_spec() if backend == "te" else local_stack_spec()
