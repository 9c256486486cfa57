"""megatron-core on a machine without CUDA: the RNG tracker and megatron's hard-coded `cuda` calls.

megatron-core 0.16.1 assumes a GPU in two ways (see shared/docs/megatron_cpu_notes.md §2):

1. Its model-parallel RNG tracker saves and restores *CUDA* generator states
   (`torch.cuda.get_rng_state`), which raises without CUDA. We swap in a tracker with the same API
   that keeps named *CPU* generator states, so dropout/init forks behave exactly as on GPU.
2. About 250 call sites create tensors with `device="cuda"`, `torch.cuda.current_device()`,
   `.cuda()`, or check `param.type() == "torch.cuda.FloatTensor"` (optimizer, grad clipping,
   schedules, DDP buffers, p2p). Copying those functions to patch them one by one would fork
   megatron; instead one TorchFunctionMode rewrites cuda devices to cpu and answers `.type()` with
   the cuda spelling. It is entered once per process, only when CUDA is unavailable.

The mode costs a Python call per torch op: about 3 % of an optimizer step and 24 % of a decode step
of the demo's model (benchmarks/remap_cost.py, docs/performance.md). So the hot paths run without it
(`native()`): a micro-batch's forward and backward inside megatron's schedule, and the decode and
evaluation loops. They create no cuda tensors once megatron's one forward-path `device="cuda"`
(the causal mask of its local softmax) is replaced; should a new one appear, it fails loudly
("Torch not compiled with CUDA enabled"), never silently. Set-up, the schedule itself, the
optimizer and checkpointing keep the mode.

Caveat: torch function modes are thread-local. Threads that megatron spawns (async checkpoint
saving) would bypass the mode, so the training loop saves synchronously on CPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_MODE: "CudaToCpuMode | None" = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() results (ints) as devices.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Route every tensor megatron asks to put on `cuda` to the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            return args[0]  # Tensor.cuda() -> stays where it is
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if name == "type" and len(args) == 1 and not kwargs:
            # megatron's optimizers assert `param.type() == "torch.cuda.FloatTensor"`.
            out = func(*args)
            if isinstance(out, str) and out.startswith("torch.") and ".cuda." not in out:
                return "torch.cuda." + out[len("torch."):]
            return out
        return func(*args, **kwargs)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker API (add/fork/get_states/set_states/reset) over CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """megatron.core.transformer.utils.get_default_causal_mask on the CPU: True above the diagonal."""
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _install_native_paths() -> None:
    """The megatron pieces a micro-batch runs, made to work without the mode (see native())."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules

    fused_softmax.get_default_causal_mask = _cpu_causal_mask  # imported there by name
    backward_step = schedules.backward_step

    def native_backward_step(*args, **kwargs):
        with native():
            return backward_step(*args, **kwargs)

    schedules.backward_step = native_backward_step  # every schedule calls it by module global


def install() -> None:
    """Enter the device-remap mode and install the CPU RNG tracker (idempotent)."""
    global _MODE
    if _MODE is not None:
        return
    torch.cuda.current_device = lambda: "cpu"  # plain Python functions: a mode cannot see them
    torch.cuda.synchronize = lambda *a, **k: None
    _install_rng_tracker()
    _install_native_paths()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()


@contextlib.contextmanager
def native():
    """Torch without the device remap, for hot code whose tensors are all on the CPU already (a
    micro-batch's forward and backward, decoding, evaluation). A no-op where the mode was never
    installed (CUDA) or is not the innermost mode (e.g. a recomputation's replay_mode())."""
    stack = torch.overrides._get_current_function_mode_stack()
    if not stack or not isinstance(stack[-1], CudaToCpuMode):
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def replay_mode():
    """The device-remap mode again, for megatron code that torch re-runs inside a backward
    (activation recomputation), where the process-wide mode is not in effect; a no-op context
    where the mode was never installed (CUDA)."""
    return CudaToCpuMode() if _MODE is not None else contextlib.nullcontext()
