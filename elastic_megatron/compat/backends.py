"""The backend ladder: which layer spec and which Mamba kernels this machine runs, chosen once.

    te      megatron's Transformer Engine spec (fused norm + linear, TE attention), CUDA only;
            Mamba kernels as in `triton` when mamba-ssm's Triton ops import, else as in `torch`
    triton  megatron's local layers + mamba-ssm's Triton kernels (`mamba_chunk_scan_combined`, the
            gated RMSNorm), CUDA only. mamba-ssm's CUDA extensions (selective_scan_cuda,
            causal-conv1d) are not needed: compat/mamba.py loads only the Triton ops
    torch   megatron's local layers + the pure-PyTorch scan of compat/mamba_kernels.py, anywhere

`model.backend=auto` takes the first rung that works here; `local` means megatron's local layers
with the best Mamba kernels here (triton, else torch). A forced rung that cannot run is one
`BackendUnavailable` line saying why and what to do. Why a ladder and not "TE or nothing": the GPU
machines a user gets are often bare (no TE wheel for their CUDA, no compiler for mamba-ssm's
extensions), and the Triton kernels alone are most of the speed (docs/performance.md).

The probe is cached per process and tests replace it (`set_probe`) to stand in for a GPU machine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

LADDER = ("te", "triton", "torch")
ANNOUNCE = "elastic-megatron: backend "  # how the one announcement line starts (tests tell it from errors)
CHOICES = ("auto", "local", *LADDER)


class BackendUnavailable(RuntimeError):
    """A forced backend that cannot run on this machine (one line: which, why, what to do)."""


@dataclass(frozen=True)
class Probe:
    """What this machine offers. A rung is usable when its field is None; else the reason it is not."""

    cuda: bool
    te: Optional[str]
    triton: Optional[str]


_PROBE: Optional[Probe] = None
_ANNOUNCED: set = set()


def _why_not_te(cuda: bool) -> Optional[str]:
    if not cuda:
        return "no CUDA device"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a TE built for another CUDA/torch (OSError, RuntimeError)
        return f"transformer_engine does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def _why_not_triton(cuda: bool) -> Optional[str]:
    if not cuda:
        return "no CUDA device (mamba-ssm's Triton kernels run on GPUs only)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from . import mamba

    return mamba.why_not_mamba_ssm_triton()


def probe() -> Probe:
    """Look once per process (imports are slow and their answer does not change)."""
    global _PROBE
    if _PROBE is None:
        cuda = torch.cuda.is_available()
        _PROBE = Probe(cuda=cuda, te=_why_not_te(cuda), triton=_why_not_triton(cuda))
    return _PROBE


def set_probe(p: Optional[Probe]) -> None:
    """Tests: pretend to be another machine (None: look again)."""
    global _PROBE
    _PROBE = p


def choose(requested: str, p: Probe) -> str:
    """The rung `requested` runs on here: auto -> the first usable one; local -> triton or torch."""
    if requested not in CHOICES:
        raise BackendUnavailable(f"model.backend={requested}: unknown backend; use one of {', '.join(CHOICES)}")
    if requested == "auto":
        return "te" if p.te is None else "triton" if p.triton is None else "torch"
    if requested == "local":
        return "triton" if p.triton is None else "torch"
    if requested == "te" and p.te is not None:
        raise BackendUnavailable(f"model.backend=te: Transformer Engine cannot run here: {p.te}; "
                                 "use model.backend=auto (or triton / torch), or install transformer-engine[pytorch]")
    if requested == "triton" and p.triton is not None:
        raise BackendUnavailable(f"model.backend=triton: mamba-ssm's Triton kernels cannot run here: {p.triton}; "
                                 "use model.backend=auto (or torch), or install mamba-ssm (its Triton ops suffice)")
    return requested


def mamba_kernels(backend: str, p: Probe) -> str:
    """Which Mamba kernels a rung uses: the Triton ones wherever they run, else pure PyTorch."""
    return "triton" if backend in ("te", "triton") and p.triton is None else "torch"


def layer_spec(backend: str) -> str:
    return "te" if backend == "te" else "local"


def describe(backend: str, p: Probe) -> str:
    """One line for the log: the rung, what it runs, and why the rungs above it were passed over."""
    kernels = {"triton": "mamba-ssm Triton kernels", "torch": "pure-PyTorch Mamba scan"}[mamba_kernels(backend, p)]
    spec = "Transformer Engine layers" if backend == "te" else "megatron local layers"
    passed = []
    if backend != "te" and p.te:
        passed.append(f"te: {p.te}")
    if backend == "torch" and p.triton:
        passed.append(f"triton: {p.triton}")
    return f"backend {backend} ({spec}, {kernels})" + (f"; passed over {'; '.join(passed)}" if passed else "")


def announce(backend: str, p: Probe) -> None:
    """Print the chosen rung once per process, on the first rank only (torchrun sets RANK)."""
    if backend in _ANNOUNCED:
        return
    _ANNOUNCED.add(backend)
    if os.environ.get("RANK", "0") == "0":
        print(f"{ANNOUNCE}{describe(backend, p)[len('backend '):]}", file=sys.stderr, flush=True)
