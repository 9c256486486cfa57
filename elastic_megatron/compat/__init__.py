"""Everything that lets megatron-core 0.16.1 run on a CPU box lives in this package, and only here.

`install()` is idempotent and is called by the process entry points (training, tests, tools) before
any model is built. On a CUDA machine with the GPU kernels installed it changes nothing.

- `cpu`: megatron's model-parallel RNG tracker and its hard-coded `cuda` device calls (no CUDA only).
- `mamba`: pure-PyTorch Mamba-2 kernels with mamba-ssm's semantics, patched into megatron's mixer,
  plus the local (non-Transformer-Engine) norm for MambaStack (whenever mamba-ssm is missing).
"""

from __future__ import annotations

import torch

_INSTALLED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def replay_context():
    """Context for megatron module code re-run by activation recomputation (see cpu.replay_mode)."""
    from . import cpu

    return cpu.replay_mode()


def install() -> None:
    """Apply the shims this machine needs. Safe to call many times."""
    global _INSTALLED
    if _INSTALLED:
        return
    import warnings

    from . import cpu, mamba

    # Expected on CPU and documented (docs/user_guide.md): torch fallbacks replace TE and apex.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")

    if not cuda_available():
        cpu.install()
    mamba.install()
    _INSTALLED = True
