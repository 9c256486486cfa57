"""Everything that lets megatron-core 0.16.1 run on a CPU box lives in this package, and only here.

`install()` is idempotent and is called by the process entry points (training, tests, tools) before
any model is built. On a CUDA machine with the GPU kernels installed it changes nothing.

- `cpu`: megatron's model-parallel RNG tracker and its hard-coded `cuda` device calls (no CUDA only);
  `native()` leaves the device remap out of the hot loops.
- `backends`: the backend ladder (te -> triton -> torch), probed once per process.
- `mamba`: which Mamba kernels megatron's mixer runs (mamba-ssm's Triton ones, or the pure-PyTorch
  ones of `mamba_kernels`), plus the local (non-Transformer-Engine) norm for MambaStack.
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


def native():
    """Context for hot code whose tensors are all on the CPU already: runs it without the CPU device
    remap (cpu.native; a no-op on CUDA)."""
    from . import cpu

    return cpu.native()


def install() -> None:
    """Apply the shims this machine needs. Safe to call many times."""
    global _INSTALLED
    if _INSTALLED:
        return
    import warnings

    from . import cpu, mamba

    # Expected on CPU and documented (docs/user_guide.md): torch fallbacks replace TE and apex.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")

    from . import backends

    if not cuda_available():
        cpu.install()
    p = backends.probe()
    if p.te is not None:
        mamba.use_local_final_norm()
    mamba.use_kernels(backends.mamba_kernels(backends.choose("auto", p), p))
    _INSTALLED = True


def select_backend(requested: str) -> str:
    """The rung `requested` (config key model.backend) runs on here; sets its Mamba kernels, says it once.

    Raises backends.BackendUnavailable (one line) for a forced rung this machine cannot run.
    """
    from . import backends, mamba

    install()
    p = backends.probe()
    backend = backends.choose(requested, p)
    kernels = backends.mamba_kernels(backend, p)
    if mamba.kernels_in_use() != kernels:
        mamba.use_kernels(kernels)
    backends.announce(backend, p)
    return backend
