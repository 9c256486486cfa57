"""The local spec's RMSNorm: torch's, with megatron's sequence-parallel marking.

megatron's `WrappedTorchNorm` refuses `config.sequence_parallel` (only Transformer Engine's norms
take it). Under sequence parallelism a pre-norm sees only this rank's part of the sequence, so its
weight gradient is partial: megatron's `finalize_model_grads` sums the gradients of parameters
marked `sequence_parallel` over the TP group. This factory builds the same `torch.nn.RMSNorm`
(same parameter name, same checkpoints) and marks its weight as TE marks its own.
"""

from __future__ import annotations

import torch


class LocalRMSNorm:
    """megatron's norm-spec signature -> torch.nn.RMSNorm, its weight marked for sequence parallelism."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"the local spec builds RMSNorm only, not {config.normalization}")
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = bool(config.sequence_parallel)
        return norm
