"""Activation recomputation, per layer, non-reentrant: keep each layer's input, recompute the rest.

    train.recompute=full     every layer's activations are dropped after its forward and rebuilt
                             in the backward from the layer's input ([s, b, h] per layer is all
                             that stays), about one extra forward of compute
    train.recompute=none     keep everything (default)

Why here and not megatron's `recompute_granularity`: MambaStack ignores it, and elastic training
does not run megatron's module forwards at all (elastic/model.py runs the subnet through its own
layer functions). So both paths use the same torch mechanism: `layer_call` wraps one layer of the
elastic forward, `recompute_megatron_layers` wraps each megatron layer's forward for parent
training. Non-reentrant checkpointing recomputes with the same autograd semantics as the plain
forward (gradients reach parameters, the router's gates and masks captured by the layer), so
losses and gradients are the same numbers. The layers draw no random numbers (no dropout), so no
RNG state needs replaying; tensor-parallel collectives inside a layer run again in the recompute.
"""

from __future__ import annotations

from functools import partial, wraps

import torch
from torch.utils.checkpoint import checkpoint

from .. import compat

MODES = ("none", "full")


def layer_call(mode: str, fn, *args):
    """fn(*args), with its activations recomputed in the backward when mode == "full" and autograd
    is recording (under no_grad, e.g. the teacher, there is nothing to save)."""
    if mode == "full" and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def recompute_megatron_layers(model: torch.nn.Module, mode: str) -> None:
    """Make every decoder layer of this stage of a megatron MambaModel recompute (mode "full"). The
    forward is replaced on the instance, so parameter names and checkpoints are unchanged."""
    if mode == "none":
        return
    for layer in model.decoder.layers:
        plain = layer.forward

        def replayable(*args, _plain=plain, **kwargs):
            with compat.replay_context():  # megatron's own code, re-run inside the backward
                return _plain(*args, **kwargs)

        @wraps(plain)
        def forward(*args, _run=replayable, **kwargs):
            return layer_call(mode, partial(_run, **kwargs), *args)

        layer.forward = forward
