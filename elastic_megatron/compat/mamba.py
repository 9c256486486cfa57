"""Make megatron's MambaMixer and MambaStack run without mamba-ssm, triton or Transformer Engine.

megatron-core 0.16.1 reaches for GPU-only code in four named places; we patch exactly those:

- `megatron.core.ssm.mamba_mixer` imports triton at module top (through the inference tensor
  ops). Without triton installed we register a do-nothing `triton` stub first, so the import
  succeeds; none of those kernels runs in training.
- `mamba_mixer.mamba_split_conv1d_scan_combined` / `mamba_chunk_scan_combined` (triton SSD) and
  `RMSNormGated` (triton gated norm) -> pure-PyTorch versions in `mamba_kernels` with the same
  signatures and semantics. `causal_conv1d_fn` stays None, so megatron uses its nn.Conv1d path.
- `mamba_block.TENorm` (the final norm is hard-coded to TE) -> torch's RMSNorm (model/norm.py).

On a GPU machine with mamba-ssm installed none of this is applied and the real kernels run.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import torch


class _Permissive:
    """Stands in for any triton object: decorators pass functions through, attributes resolve."""

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return self

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Permissive()

    def __getitem__(self, item):
        return self


def _install_triton_stub() -> None:
    if "triton" in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    for name in ("triton", "triton.language"):
        mod = types.ModuleType(name)
        mod.__getattr__ = lambda attr: _Permissive()  # PEP 562 module __getattr__
        mod.__elastic_megatron_stub__ = True
        sys.modules[name] = mod
    sys.modules["triton"].language = sys.modules["triton.language"]


def have_mamba_ssm() -> bool:
    if not torch.cuda.is_available():
        return False  # its kernels are triton/CUDA only, even when the package is present
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except Exception:
        return False
    return True


def install() -> None:
    """Patch megatron's Mamba modules with the pure-PyTorch kernels where mamba-ssm cannot run."""
    if not te_usable():
        _install_triton_stub()
        import megatron.core.ssm.mamba_block as mamba_block

        from ..model.norm import LocalRMSNorm

        mamba_block.TENorm = LocalRMSNorm
    if have_mamba_ssm():
        return
    if torch.cuda.is_available():
        warnings.warn(
            "mamba-ssm is not installed: Mamba layers use the slow pure-PyTorch kernels. "
            "Install the GPU extra: pip install 'elastic-megatron[gpu]'."
        )
    _install_triton_stub()
    import megatron.core.ssm.mamba_mixer as mixer

    from . import mamba_kernels as k

    from megatron.core import parallel_state
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    class ExtendedRMSNorm(k.RMSNormGated):
        """megatron's ExtendedRMSNorm (its base class is the triton norm): weight sharded on dim 0."""

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
                dp_cp_group=metadata["dp_cp_group"],
            )

    mixer.ExtendedRMSNorm = ExtendedRMSNorm
    mixer.RMSNormGated = k.RMSNormGated
    mixer.mamba_chunk_scan_combined = k.mamba_chunk_scan_combined
    mixer.mamba_split_conv1d_scan_combined = k.mamba_split_conv1d_scan_combined
    mixer.causal_conv1d_fn = None
    mixer.HAVE_MAMBA_SSM = True


def te_usable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()
