"""NemotronH with per-layer widths: the modelling code shipped with heterogeneous elastic-megatron exports.

A subnet cut from an elastic parent may keep a different number of Mamba heads, Mamba head
channels, attention query heads or MLP neurons in every layer. Stock `NemotronHConfig` sizes are
model-wide scalars, so such an export carries `layer_sizes` (one dict per layer) and this file,
which transformers loads with `trust_remote_code=True`:

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

Every layer is stock transformers NemotronH code built from its own copy of the config; nothing
else changes (weights, cache, generation). This file is copied verbatim next to config.json as
`modeling_nemotron_h_elastic.py` and imports only transformers.
"""

from __future__ import annotations

import copy

import torch
from transformers.models.nemotron_h import modeling_nemotron_h as base
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

_SIZE_KEYS = ("intermediate_size", "mamba_num_heads", "mamba_head_dim", "num_attention_heads")


class NemotronHElasticConfig(NemotronHConfig):
    """NemotronHConfig + `layer_sizes`: per layer {intermediate_size, mamba_num_heads, mamba_head_dim,
    num_attention_heads}; the scalar sizes are the largest of them."""

    model_type = "nemotron_h_elastic"

    def for_layer(self, index: int) -> NemotronHConfig:
        sizes = (getattr(self, "layer_sizes", None) or [{}] * self.num_hidden_layers)[index]
        cfg = copy.copy(self)
        for key in _SIZE_KEYS:
            if key in sizes:
                object.__setattr__(cfg, key, int(sizes[key]))
        return cfg


class _PerLayerInit:
    """The stock initialiser sizes Mamba's A_log / dt_bias from the model-wide head count: run it
    with the layer's own config for the mixers built here (both PreTrainedModels below call it)."""

    @torch.no_grad()
    def _init_weights(self, module):
        layer_cfg = getattr(module, "layer_config", None)
        if layer_cfg is None:
            return super()._init_weights(module)
        model_cfg = self.config
        self.config = layer_cfg
        try:
            return super()._init_weights(module)
        finally:
            self.config = model_cfg


class NemotronHElasticModel(_PerLayerInit, base.NemotronHModel):
    config_class = NemotronHElasticConfig

    def __init__(self, config: NemotronHElasticConfig):
        super().__init__(config)
        for i, block in enumerate(self.layers):
            layer_cfg = config.for_layer(i)
            block.mixer = base.MIXER_TYPES[block.block_type](layer_cfg, layer_idx=i)
            block.mixer.layer_config = layer_cfg
        self.post_init()


class NemotronHElasticForCausalLM(_PerLayerInit, base.NemotronHForCausalLM):
    config_class = NemotronHElasticConfig

    def __init__(self, config: NemotronHElasticConfig):
        super().__init__(config)
        self.model = NemotronHElasticModel(config)
        self.post_init()


NemotronHElasticConfig.register_for_auto_class()
NemotronHElasticForCausalLM.register_for_auto_class("AutoModelForCausalLM")
