"""Which Mamba kernels megatron's MambaMixer runs: mamba-ssm's Triton ones, or our pure-PyTorch ones.

megatron-core 0.16.1 reaches for GPU-only code in four named places; we set exactly those:

- `megatron.core.ssm.mamba_mixer` imports triton at module top (through the inference tensor
  ops). Without triton installed we register a do-nothing `triton` stub first, so the import
  succeeds; none of those kernels runs in training.
- `mamba_mixer.mamba_chunk_scan_combined` / `mamba_split_conv1d_scan_combined` (the SSD scan) and
  `RMSNormGated` / `ExtendedRMSNorm` (the gated norm): mamba-ssm's Triton kernels (`use_kernels
  ("triton")`) or the pure-PyTorch versions in `mamba_kernels` with the same signatures and
  semantics (`use_kernels("torch")`). `causal_conv1d_fn` stays None without the causal-conv1d
  extension, so megatron uses its nn.Conv1d path.
- `mamba_block.TENorm` (the final norm is hard-coded to TE) -> torch's RMSNorm (model/norm.py)
  wherever Transformer Engine cannot run.

mamba-ssm's Triton kernels are plain Python, but `import mamba_ssm` runs its `__init__`, which
loads the compiled `selective_scan_cuda` extension (absent from a wheel built with
MAMBA_SKIP_CUDA_BUILD) and the full model zoo. We only need `mamba_ssm.ops.triton`, so when the
package import fails we register the package without running its `__init__` and import the two
Triton modules directly (`triton_ops`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Optional

_ORIGINAL: dict = {}  # mamba_mixer's own attributes, kept before we first set them


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


def _stub_attribute(name: str):
    if name.startswith("__"):  # __file__, __wrapped__, ...: absent, as inspect and pickle expect
        raise AttributeError(name)
    return _Permissive()


def install_triton_stub() -> None:
    if "triton" in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    # megatron.core's own import reaches torch.compile, whose inductor must see triton's real
    # absence; only the mixer's module-top import afterwards gets the stub
    import megatron.core  # noqa: F401

    for name in ("triton", "triton.language"):
        mod = types.ModuleType(name)
        mod.__getattr__ = _stub_attribute  # PEP 562 module __getattr__
        mod.__elastic_megatron_stub__ = True
        sys.modules[name] = mod
    sys.modules["triton"].language = sys.modules["triton.language"]


def triton_ops():
    """(ssd_combined, layernorm_gated) from mamba-ssm, with or without its CUDA extensions."""
    try:
        import mamba_ssm  # noqa: F401  (a full install: its __init__ imports cleanly)
    except Exception:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mamba-ssm is not installed") from None
        pkg = types.ModuleType("mamba_ssm")  # the package without its __init__ (see module docstring)
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__, pkg.__file__ = spec, spec.origin
        sys.modules["mamba_ssm"] = pkg
    ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    norm = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    return ssd, norm


def why_not_mamba_ssm_triton() -> Optional[str]:
    """None when mamba-ssm's Triton SSD scan and gated norm import here, else why not (one line)."""
    try:
        ssd, norm = triton_ops()
        ssd.mamba_chunk_scan_combined, norm.rmsnorm_fn, norm.RMSNorm  # noqa: B018 (attributes exist)
    except Exception as exc:
        return f"mamba-ssm's Triton ops do not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def _extended_norm(base):
    """megatron's ExtendedRMSNorm on a given gated-norm class: its weight is sharded on dim 0.

    megatron defines ExtendedRMSNorm once, at import, on whatever RMSNormGated imported then (a
    MagicMock without mamba-ssm), so we rebuild it on the class the chosen kernels use.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    class ExtendedRMSNorm(base):
        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
                dp_cp_group=metadata["dp_cp_group"],
            )

    return ExtendedRMSNorm


def use_kernels(kind: str) -> None:
    """Point megatron's MambaMixer at one set of kernels, "triton" or "torch" (compat/backends.py picks)."""
    if kind not in ("triton", "torch"):
        raise ValueError(f"unknown Mamba kernels '{kind}'; use triton or torch")
    if kind == "triton":
        ssd, norm = triton_ops()  # before megatron's mixer import, so its own try-imports succeed too
    install_triton_stub()
    import megatron.core.ssm.mamba_mixer as mixer

    from . import mamba_kernels as k

    for name in ("RMSNormGated", "ExtendedRMSNorm", "mamba_chunk_scan_combined",
                 "mamba_split_conv1d_scan_combined", "causal_conv1d_fn", "HAVE_MAMBA_SSM"):
        _ORIGINAL.setdefault(name, getattr(mixer, name, None))
    if kind == "triton":
        gated_norm, scan = norm.RMSNorm, ssd.mamba_chunk_scan_combined
        # mamba-ssm's fused split-conv-scan calls the causal-conv1d CUDA extension; without it we
        # compose the same block around its Triton scan and norm.
        fused_ok = getattr(ssd, "causal_conv1d_fwd_function", None) is not None or \
            getattr(ssd, "causal_conv1d_cuda", None) is not None
        split = ssd.mamba_split_conv1d_scan_combined if fused_ok else k.split_conv1d_scan_on(scan, norm.rmsnorm_fn)
        conv = _ORIGINAL["causal_conv1d_fn"]
    else:
        gated_norm, scan, split, conv = k.RMSNormGated, k.mamba_chunk_scan_combined, k.mamba_split_conv1d_scan_combined, None
    mixer.RMSNormGated = gated_norm
    mixer.ExtendedRMSNorm = _extended_norm(gated_norm)
    mixer.mamba_chunk_scan_combined = scan
    mixer.mamba_split_conv1d_scan_combined = split
    mixer.causal_conv1d_fn = conv
    mixer.HAVE_MAMBA_SSM = True  # megatron asserts it; our kernels stand in when mamba-ssm is absent
    mixer.__elastic_megatron_kernels__ = kind


def kernels_in_use() -> Optional[str]:
    """"triton" / "torch" once `use_kernels` ran, else None."""
    mixer = sys.modules.get("megatron.core.ssm.mamba_mixer")
    return getattr(mixer, "__elastic_megatron_kernels__", None)


def use_local_final_norm() -> None:
    """MambaStack's final norm is hard-coded to TENorm: torch's RMSNorm wherever TE cannot run."""
    install_triton_stub()
    import megatron.core.ssm.mamba_block as mamba_block

    from ..model.norm import LocalRMSNorm

    mamba_block.TENorm = LocalRMSNorm
