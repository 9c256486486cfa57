"""The hybrid Mamba-Attention parent: megatron-core's MambaModel, configured as the Nemotron-H family.

    pattern "M-M*-M-M*-"        M = Mamba-2 mixer, * = GQA attention, - = squared-ReLU MLP
    tokens [b, s] -> embedding [s, b, h] -> pre-norm residual layers -> RMSNorm -> logits [b, s, V/TP]

RMSNorm everywhere, untied input/output embeddings, no position embedding (Mamba layers carry
position), no biases. `build_model` builds this pipeline stage's part of the model and
initialises it so that every TP x PP layout holds the same function (see model/sharding.py).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.mamba import MambaModel
from megatron.core.transformer import TransformerConfig

from ..config import ModelConfig, RunConfig
from ..parallel import ParallelLayout, stage_sizes
from . import sharding
from .spec import resolve_backend, stack_spec


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where this rank's stage of the model lives (every parameter is on one device)."""
    return next(model.parameters()).device


def padded_vocab_size(m: ModelConfig, tokenizer_vocab: int, tp: int) -> int:
    """Vocab rounded up so that every TP shard of the embedding is equal (megatron's rule)."""
    if m.vocab_size:
        return m.vocab_size
    multiple = m.make_vocab_size_divisible_by * tp
    return ((tokenizer_vocab + multiple - 1) // multiple) * multiple


def transformer_config(cfg: RunConfig, layout: ParallelLayout, dtype: torch.dtype,
                       initialize: bool = True) -> TransformerConfig:
    m = cfg.model
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        mamba_num_heads=m.mamba_num_heads,
        mamba_head_dim=m.mamba_head_dim,
        mamba_num_groups=m.mamba_num_groups,
        mamba_state_dim=m.mamba_state_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        activation_func=squared_relu,
        gated_linear_unit=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=layout.tensor,
        sequence_parallel=layout.sequence_parallel,
        pipeline_model_parallel_size=layout.pipeline,
        num_layers_in_first_pipeline_stage=layout.layers_in_first_stage,
        num_layers_in_last_pipeline_stage=layout.layers_in_last_stage,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=on_cpu,
        # megatron's CPU init draws every weight as a full (TP=1) master tensor; weights about to be
        # loaded skip it (their storage then stays unresident until written)
        perform_initialization=initialize,
        # Fusions are CUDA kernels; megatron falls back to plain torch when they are off.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        # gloo matches a batched send/recv pair with the wrong peer message when prev == next
        # stage (PP=2) and the losses are silently wrong (measured), so never batch p2p on gloo.
        batch_p2p_comm=layout.backend != "gloo",
    )


def stage_layer_offset(cfg: RunConfig, layout: ParallelLayout, pp_rank: int) -> int:
    sizes = stage_sizes(cfg.model.num_layers, layout.pipeline, layout.layers_in_first_stage,
                        layout.layers_in_last_stage)
    return sum(sizes[:pp_rank])


def build_model(cfg: RunConfig, layout: ParallelLayout, vocab_size: int, dtype: torch.dtype,
                initialize: bool = True) -> MambaModel:
    """This rank's pipeline stage of the parent, initialised layout-independently from cfg.train.seed
    (`initialize=False`: left as megatron built it, for weights about to be loaded: a 12B import
    then skips drawing every full tensor on every rank)."""
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    model = MambaModel(
        config=transformer_config(cfg, layout, dtype, initialize),
        mamba_stack_spec=stack_spec(resolve_backend(cfg.model.backend)),
        vocab_size=vocab_size,
        max_sequence_length=cfg.model.max_sequence_length,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        hybrid_override_pattern=cfg.model.hybrid_override_pattern,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
    )
    if cfg.model.heterogeneous:
        _rebuild_heterogeneous_layers(model, cfg, layout, pp_rank)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if initialize:
        init_weights(model, cfg, layout, pp_rank)
    # megatron's mixer creates A_log, D and dt_bias in fp32 whatever params_dtype is; a bf16 model
    # with a few fp32 parameters breaks megatron's optimizers' checkpoint code (their fp32 main
    # params no longer line up with the parameters), so every parameter takes the run's dtype, as
    # Megatron-LM's Float16Module does. The optimizer keeps fp32 main copies of all of them.
    return model.to(dtype)


def _rebuild_heterogeneous_layers(model: MambaModel, cfg: RunConfig, layout: ParallelLayout, pp_rank: int) -> None:
    """megatron builds every layer from one TransformerConfig; a sliced model has per-layer widths,
    so each layer whose widths differ is rebuilt from its own copy of the config."""
    from dataclasses import replace

    from megatron.core.transformer.spec_utils import build_module

    offset = stage_layer_offset(cfg, layout, pp_rank)
    spec = model.mamba_stack_spec.submodules
    base = model.config
    for i, layer in enumerate(model.decoder.layers):
        gi = offset + i
        m = cfg.model.for_layer(gi)
        kind = cfg.model.hybrid_override_pattern[gi]
        lc = replace(base, ffn_hidden_size=m.ffn_hidden_size, mamba_num_heads=m.mamba_num_heads,
                     mamba_head_dim=m.mamba_head_dim, num_attention_heads=m.num_attention_heads)
        if kind == "M":
            new = build_module(spec.mamba_layer, config=lc, residual_in_fp32=False, layer_number=gi + 1,
                               pp_layer_offset=offset, pg_collection=model.pg_collection)
        elif kind == "*":
            new = build_module(spec.attention_layer, config=lc, layer_number=i + 1, pg_collection=model.pg_collection)
        else:
            new = build_module(spec.mlp_layer, config=lc, layer_number=i + 1, pg_collection=model.pg_collection)
        model.decoder.layers[i] = new


def global_name(local_name: str, layer_offset: int) -> str:
    """decoder.layers.{i} on this stage -> decoder.layers.{i + offset} in the whole model."""
    return re.sub(r"^(decoder\.layers\.)(\d+)", lambda mt: f"{mt.group(1)}{int(mt.group(2)) + layer_offset}",
                  local_name)


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: RunConfig, layout: ParallelLayout, pp_rank: int) -> None:
    offset = stage_layer_offset(cfg, layout, pp_rank)
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), layout.tensor
    for name, param in model.named_parameters():
        gname = global_name(name, offset)
        full = sharding.init_full(gname, sharding.full_shape(gname, param.shape, tp),
                                  sharding.layer_config(gname, cfg.model), cfg.train.seed)
        param.copy_(sharding.shard(gname, full, tp_rank, tp, cfg.model))


def count_parameters(m: ModelConfig, vocab_size: int) -> int:
    """Parameters of the whole (TP=1) model in closed form, from the config alone (per-layer widths too)."""
    h, n, g = m.hidden_size, m.mamba_state_dim, m.mamba_num_groups
    total = 2 * vocab_size * h + h  # input and output embeddings, final norm
    for i, kind in enumerate(m.hybrid_override_pattern):
        lm = m.for_layer(i)
        if kind == "M":
            d_inner, heads = lm.mamba_num_heads * lm.mamba_head_dim, lm.mamba_num_heads
            conv_dim = d_inner + 2 * g * n
            total += (h  # pre-norm
                      + h * (2 * d_inner + 2 * g * n + heads)  # in_proj [z | x | B | C | dt]
                      + conv_dim * 4 + conv_dim  # depthwise conv weight + bias
                      + 3 * heads  # A_log, D, dt_bias
                      + d_inner  # gated norm
                      + d_inner * h)  # out_proj
        elif kind == "*":
            q, kv = lm.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
            total += h + h * (q + 2 * kv) + q * h
        else:
            total += h + 2 * h * lm.ffn_hidden_size
    return total
