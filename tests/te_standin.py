"""A CPU-runnable stand-in for megatron's Transformer Engine layer spec, with TE's parameter layout.

`FusedRMSNormColumnParallelLinear` is what `TELayerNormColumnParallelLinear` is to the model: an
RMSNorm fused into the following column-parallel linear, holding `weight` and `layer_norm_weight`
(replicated over TP). `te_layout_spec()` is megatron's `mamba_stack_spec` with that module where TE
has its fused linears, megatron's local row-parallel linear and attention elsewhere, and the
layer-level norms left as IdentityOp -- so every parameter name, shape and module path is the TE
spec's, and the whole model runs here. Tests swap it in for `model.spec.te_stack_spec`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class FusedRMSNormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm(x) @ W^T with the norm's weight as `layer_norm_weight`, as TE's fused module."""

    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias, skip_bias_add,
                 is_expert, tp_comm_buffer_name=None, tp_group=None, stride=1, **_):
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         gather_output=gather_output, skip_bias_add=skip_bias_add, is_expert=is_expert,
                         stride=stride, tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        self.layer_norm_weight.sequence_parallel = config.sequence_parallel  # as TE marks it

    def forward(self, x, *args, **kwargs):
        return super().forward(F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps), *args, **kwargs)


def te_layout_spec():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    fused = FusedRMSNormColumnParallelLinear
    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(in_proj=fused, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add)),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(linear_qkv=fused, core_attention=DotProductAttention,
                                                                         linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fused, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add)),
    ))
