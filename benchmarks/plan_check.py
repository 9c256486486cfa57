"""The memory planner (elastic_megatron/plan.py) against tensors measured on this CPU.

    python benchmarks/plan_check.py                                        # TP 1
    torchrun --standalone --nproc_per_node=2 benchmarks/plan_check.py --tp 2   # TP 2, SP off and on

For the tiny parent and the medium one of benchmarks/elastic_cost.py, in bf16 as on a GPU, one
process builds what elastic training holds (student in megatron DDP with its fp32 main-grad
buffers, megatron's optimizer, the frozen teacher), then runs one elastic micro-batch of the
full-size budget as the training loop runs it (the fixed full subnet, `fixed_decision`) through
the loop's own forward and loss (`_forward_step`), its backward and one optimizer step. Measured:
the model-state tensors (parameters, main grads, optimizer state, teacher); the distinct storages
autograd saved during the forward (a saved-tensors hook: what is held at the forward/backward
turn); and the step's peak, the most tensor storage alive at once during forward and backward (a
dispatch-mode tracker that adds each op's new outputs and subtracts them when freed; views,
in-place and out= results allocate nothing and are skipped). Allocator slack and the runtime are
left out; the planner's `--overhead` covers them. Side by side with the planner's terms for the
CPU's kernels (`kernels="torch"`: the pure-PyTorch SSD scan), recompute none and full. The
`.../soft` rows measure a router-learning micro-batch in soft mode instead (budget 1, full width
with prefix masks), planned as a soft stage (`Phase(soft=True)`).
Under `--tp 2` (two gloo ranks) every row runs with sequence parallelism off and on (`.../sp`:
the residual stream, norms and layer outputs split along the sequence over the ranks); rank 0's
tensors are reported (the ranks hold the same shapes). One JSON line; `planned_vs_measured`
compares the totals (model state + step peak).
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from elastic_cost import MEDIUM  # noqa: E402

from elastic_megatron.config import load_config  # noqa: E402

VOCAB = 64
CASES = {"tiny": ([], 2, 256), "medium": ([*MEDIUM, "elastic.mamba_heads=[1.0,0.5]", "elastic.attn_heads=[1.0]"], 1, 1024)}  # overrides, mbs, seq


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


class PeakTracker(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive, and their peak: every op's
    outputs are recorded (once per storage) and dropped when the storage is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.cur = self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if key in self.live or n == 0:
            return
        self.live[key] = n
        self.cur += n
        self.peak = max(self.peak, self.cur)

        def gone(k=key, n=n):
            if self.live.pop(k, None) is not None:
                self.cur -= n

        weakref.finalize(st, gone)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view, an in-place or an out= result: no new storage (e.g. main_grad.add_)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def measure(name: str, recompute: str, soft: bool = False, tp: int = 1, sp: bool = False) -> dict:
    from elastic_megatron.elastic.model import ElasticHybrid
    from elastic_megatron.elastic.router import build_router
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout, init_distributed
    from elastic_megatron.plan import Phase, rank_memory
    from elastic_megatron.train.elastic_loop import _forward_step, fixed_decision
    from elastic_megatron.train.optim import build_optimizer, wrap_ddp

    overrides, mbs, seq = CASES[name]
    cfg = load_config(None, [*overrides, "train.precision=bf16", f"train.recompute={recompute}",
                             f"train.micro_batch_size={mbs}", f"train.global_batch_size={mbs}",
                             f"model.max_sequence_length={max(seq, 4096)}", f"parallel.tensor={tp}",
                             f"parallel.sequence_parallel={str(sp).lower()}"])
    layout = ParallelLayout.resolve(cfg, tp, training=True)
    init_distributed(layout, cfg.train.seed)
    student = build_model(cfg, layout, VOCAB, torch.bfloat16)
    teacher = build_model(cfg, layout, VOCAB, torch.bfloat16).eval()
    ddp = wrap_ddp(student, layout)
    opt = build_optimizer(ddp, cfg.train, layout, torch.bfloat16)
    measured = {"weights": storage_bytes(student.parameters()),
                "main_grads": storage_bytes([b.grad_data for b in ddp.buffers]),
                "teacher": storage_bytes(teacher.parameters())}
    router = build_router(cfg, VOCAB, tp=tp)
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, VOCAB, (mbs, seq), generator=g),
             "labels": torch.randint(0, VOCAB, (mbs, seq), generator=g),
             "loss_mask": torch.ones(mbs, seq), "position_ids": torch.arange(seq).expand(mbs, seq)}
    full = router.fixed_subnets(cfg.elastic.subnets, layout.tensor)[0]  # budget 0 is the parent itself
    dec = fixed_decision(router(0, step=0, total_steps=2, seed=1), full, router.cost_of(full))
    if soft:  # budget 1 while the router learns: full width with prefix masks (elastic.mode=soft)
        dec = router(1, step=0, total_steps=2, seed=1)
    saved = []
    params = {p.untyped_storage().data_ptr() for p in list(student.parameters()) + list(router.parameters())}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    tracker = PeakTracker()
    with tracker:  # the whole forward and backward: the step's peak of new tensors
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, loss_fn = _forward_step(ElasticHybrid(student, cfg, layout), ElasticHybrid(teacher, cfg, layout),
                                         [dec], router, cfg, iter([batch]), None)
            total, _ = loss_fn(out)
        saved_at_turn = storage_bytes(saved)
        del out
        saved.clear()  # the backward frees what it uses: only autograd holds it now
        total.backward()
    measured["step_peak"] = tracker.peak
    opt.step()  # creates Adam's state: then the optimizer's tensors are all there
    opt_tensors = []
    for o in getattr(opt, "chained_optimizers", [opt]):
        for st in o.optimizer.state.values():
            opt_tensors += [t for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
        for group in getattr(o, "fp32_from_float16_groups", []):
            opt_tensors += group
    measured["optimizer"] = storage_bytes(opt_tensors)
    measured["saved_at_turn"] = saved_at_turn
    ph = Phase("elastic", seq, mbs, mbs, True, soft=soft)
    planned = rank_memory(cfg, VOCAB, tp, 1, 1, ph, recompute, False, 2, kernels="torch", sequence_parallel=sp)
    planned["saved_at_turn"] = planned["activations"] + planned["logits"]
    planned["step_peak"] = planned["saved_at_turn"] + planned["backward"]
    keys = ["weights", "main_grads", "optimizer", "teacher", "saved_at_turn", "step_peak"]
    state = ["weights", "main_grads", "optimizer", "teacher"]
    m_total, p_total = (sum(d[k] for k in state + ["step_peak"]) for d in (measured, planned))
    mib = lambda d: {k: round(d[k] / 2**20, 2) for k in keys}  # noqa: E731
    return {"measured_mib": mib(measured), "planned_mib": mib(planned),
            "planned_backward_mib": round(planned["backward"] / 2**20, 2),
            "total_measured_mib": round(m_total / 2**20, 1), "total_planned_mib": round(p_total / 2**20, 1),
            "planned_vs_measured": round(p_total / m_total, 3)}


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29741")
    from elastic_megatron.parallel import destroy_distributed

    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated rows to run, e.g. medium/full/soft (default: all)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun with that many ranks)")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    torch.manual_seed(0)
    res = {}
    for name in CASES:
        for sp in ((False, True) if args.tp > 1 else (False,)):
            for recompute in ("none", "full"):
                for soft in (False, True):
                    row = f"{name}/{recompute}" + ("/soft" if soft else "") + ("/sp" if sp else "")
                    if only and row not in only:
                        continue
                    res[row] = measure(name, recompute, soft, args.tp, sp)
                    destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
