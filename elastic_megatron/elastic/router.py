"""The routers: one small MLP per axis maps a one-hot budget to a choice (paper §3, Eq. 6-12).

    router = build_router(cfg, vocab_size, layer_order=order)      # or RouterSet(...) directly
    opt = router_optimizer(router, cfg.router)
    d = router(budget_idx, step, total_steps, seed, micro=micro)   # a RouterDecision
    # hard mode: run the sliced subnet d.subnet, multiplying layer i's output by d.layer_gates[i]
    loss = task_loss + cfg.router.budget_weight * d.budget_loss
    loss.backward(); all_reduce_router_grads(router); opt.step(); opt.zero_grad()

Per axis: logits = MLP(one_hot(budget)) x scale(step), scale 1 -> 10 linearly; probs =
softmax((logits + Gumbel) / tau(step)), tau 1.0 -> 0.05 linearly. Heterogeneous axes output one
choice vector per layer of their type ([n_layers, n_choices]); hidden and depth are always one
choice model-wide. Depth chooses how many layers to keep, taken from `layer_order` (most
important first).

The argmax of every axis gives the Subnet the model runs (hard mode). So that the task loss still
reaches the router without changing the model's numbers, each layer's output is multiplied by a
straight-through gate p / p.detach(): its value is exactly 1.0, its gradient grad(p) / p, where p is
the product of the chosen probabilities that shape the layer (Mamba: mamba_heads, mamba_head_dim, hidden,
depth; attention: attn_heads, hidden, depth; MLP: ffn, hidden, depth). Training numerics therefore
equal deployment exactly. Soft mode uses `soft_masks` (probability-weighted prefix masks) instead.

The budget loss |E[cost] / target - 1| uses the expected sizes sum_i probs_i x choice_i (cost.py).
Gumbel noise comes from a private torch.Generator seeded by (seed, step, micro, budget), so every
rank that passes the same four numbers draws the same subnet; the global RNG is never touched.
The router is replicated on every rank and kept in fp32: average its gradients with
`all_reduce_router_grads` before its own optimizer step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, RouterConfig, RunConfig
from .cost import expected_memory, expected_params, resolve_budgets, smallest_subnet, subnet_cost
from .subnet import AXES, AxisChoices, Subnet, layer_slots, resolve_choices, subnet_from_spec

# Which layer types each axis shapes ("" = every layer).
_AXIS_TYPE = {"hidden": "", "mamba_heads": "M", "mamba_head_dim": "M", "attn_heads": "*", "ffn": "-", "depth": ""}
HETEROGENEOUS_OK = ("mamba_heads", "mamba_head_dim", "attn_heads", "ffn")


class AxisRouter(nn.Module):
    """one-hot budget [n_budgets] -> Linear -> LeakyReLU -> Linear -> logits [n_choices] or [n_layers, n_choices]."""

    def __init__(self, n_budgets: int, hidden: int, n_choices: int, n_layers: int = 0):
        super().__init__()
        self.n_choices, self.n_layers = n_choices, n_layers  # n_layers = 0: homogeneous
        self.fc1 = nn.Linear(n_budgets, hidden)
        self.act = nn.LeakyReLU(0.1)  # slope as in Megatron's Flextron router
        self.fc2 = nn.Linear(hidden, n_choices * max(n_layers, 1))

    def forward(self, onehot: Tensor) -> Tensor:
        z = self.fc2(self.act(self.fc1(onehot)))
        return z.view(self.n_layers, self.n_choices) if self.n_layers else z


@dataclass
class RouterDecision:
    subnet: Subnet  # the argmax choices as integer sizes (what the model runs in hard mode)
    probs: dict[str, Tensor]  # soft (Gumbel-softmax) probabilities: [n_choices] or [n_layers, n_choices]
    chosen_prob: dict[str, Tensor]  # probability of the chosen choice: scalar or [n_layers]
    layer_gates: Tensor  # [L]; value exactly 1.0, gradient of the layer's chosen-probability product
    expected_cost: Tensor  # float64 scalar: expected params (or bytes) under `probs`
    budget_loss: Tensor  # fp32 scalar: |expected_cost / target - 1|
    budget_idx: int = 0
    fixed: bool = False  # the subnet is not the router's (full model or hand-picked): it runs hard, no soft masks


def noise_seed(seed: int, step: int, micro: int, budget_idx: int) -> int:
    """A 63-bit seed that depends on all four numbers (same on every process and Python run)."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{budget_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def prefix_masks(width: int, sizes: Sequence[int], groups: int = 1) -> Tensor:
    """[len(sizes), width] 0/1 masks; row j keeps the first sizes[j] / groups units of every group
    (units laid out group-major: group 0's units first)."""
    per = width // groups
    pos = torch.arange(width) % per
    return torch.stack([(pos < s // groups).float() for s in sizes])


class RouterSet(nn.Module):
    """One AxisRouter per axis; forward(budget_idx, ...) -> RouterDecision."""

    def __init__(self, m: ModelConfig, vocab_size: int, choices: AxisChoices, targets: Sequence[float],
                 rcfg: RouterConfig, heterogeneous: Sequence[str] = (), layer_order: Optional[Sequence[int]] = None,
                 seed: int = 0):
        super().__init__()
        p = m.hybrid_override_pattern
        self.m, self.vocab, self.choices, self.rcfg = m, vocab_size, choices, rcfg
        self.targets = [float(t) for t in targets]
        self.heterogeneous = tuple(heterogeneous)
        bad = set(self.heterogeneous) - set(HETEROGENEOUS_OK)
        if bad:
            raise ValueError(f"axes {sorted(bad)} cannot be heterogeneous; allowed: {HETEROGENEOUS_OK}")
        self.layer_order = list(layer_order) if layer_order is not None else list(range(len(p)))
        if sorted(self.layer_order) != list(range(len(p))):
            raise ValueError(f"layer_order must be a permutation of 0..{len(p) - 1}, got {self.layer_order}")
        self.slots = layer_slots(p)
        self.count = {a: (p.count(t) if t else 1) for a, t in _AXIS_TYPE.items()}
        self.axes = [a for a in AXES if self.count[a] > 0]  # axes whose layer type exists
        # Build under a fixed seed without touching the global RNG: same seed -> same router on every rank.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.routers = nn.ModuleDict({
                a: AxisRouter(len(self.targets), rcfg.hidden_size, len(choices.of(a)),
                              self.count[a] if a in self.heterogeneous else 0) for a in self.axes})
        rank = {layer: r for r, layer in enumerate(self.layer_order)}
        # Constant tables as (non-saved) buffers: they follow `router.to(device)`, so no step copies
        # them from the host. keep_table[j, i] = 1 if depth choice j keeps layer i.
        self.register_buffer("keep_table", torch.tensor([[float(rank[i] < d) for i in range(len(p))]
                                                         for d in choices.depth], dtype=torch.float64), persistent=False)
        for a in self.axes:  # choice sizes
            self.register_buffer(f"values_{a}", torch.tensor(choices.of(a), dtype=torch.float64), persistent=False)
        widths = {"hidden": (m.hidden_size, 1), "mamba_heads": (m.mamba_num_heads, m.mamba_num_groups),
                  "mamba_head_dim": (m.mamba_head_dim, 1), "attn_heads": (m.num_attention_heads, m.num_query_groups),
                  "ffn": (m.ffn_hidden_size, 1)}
        for a, (width, groups) in widths.items():  # soft mode's prefix masks, one row per choice
            if a in self.axes:
                self.register_buffer(f"prefix_{a}", prefix_masks(width, choices.of(a), groups), persistent=False)

    # ------------------------------------------------------------------ schedules
    def schedule(self, step: int, total_steps: int) -> tuple[float, float]:
        """(logit scale, tau) at `step`, both linear from start (step 0) to end (step total_steps - 1)."""
        r = self.rcfg
        t = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
        return r.scale_start + (r.scale_end - r.scale_start) * t, r.tau_start + (r.tau_end - r.tau_start) * t

    def logits(self, budget_idx: int) -> dict[str, Tensor]:
        dev = self.routers["hidden"].fc1.weight.device
        onehot = F.one_hot(torch.tensor(budget_idx, device=dev), len(self.targets)).float()
        return {a: r(onehot) for a, r in self.routers.items()}

    # ------------------------------------------------------------------ decisions
    def forward(self, budget_idx: int, step: int = 0, total_steps: int = 1, seed: int = 0, hard: bool = True,
                micro: int = 0) -> RouterDecision:
        """Sample a subnet for `budget_idx`. hard=True: gates carry the router gradient; hard=False (soft
        mode): gates are constant ones and the caller applies `soft_masks(decision)` instead."""
        return self.draw(self.logits(budget_idx), budget_idx, step, total_steps, seed, hard, micro)

    def draw(self, logits: dict[str, Tensor], budget_idx: int, step: int = 0, total_steps: int = 1, seed: int = 0,
             hard: bool = True, micro: int = 0) -> RouterDecision:
        """`forward` from precomputed `logits(budget_idx)`: micro-batches of one budget can share one router pass."""
        scale, tau = self.schedule(step, total_steps)
        # Drawn on the host by a private generator, so the same bits on every rank and device (CPU,
        # CUDA): one small copy to the router's device per decision, outside the layer loop.
        gen = torch.Generator().manual_seed(noise_seed(seed, step, micro, budget_idx))
        sizes = [z.numel() for z in logits.values()]  # one draw, split over the axes in fixed order
        dev = self.keep_table.device
        noise = torch.rand(sum(sizes), generator=gen).clamp_min(1e-20).to(dev).split(sizes)
        probs = {}
        for (a, z), u in zip(logits.items(), noise):
            gumbel = -torch.log(-torch.log(u.view_as(z)))
            probs[a] = torch.softmax((z * scale + gumbel) / tau, dim=-1)
        return self.decide(probs, budget_idx, hard)

    @torch.no_grad()
    def inference(self, budget_idx: int) -> Subnet:
        """The deployed subnet for a budget: argmax of the noise-free logits (gates are 1)."""
        return self.to_subnet({a: z.argmax(-1) for a, z in self.logits(budget_idx).items()})

    def decide(self, probs: dict[str, Tensor], budget_idx: int, hard: bool = True) -> RouterDecision:
        idx = {a: q.argmax(-1) for a, q in probs.items()}
        chosen = {a: q.gather(-1, idx[a].unsqueeze(-1)).squeeze(-1) for a, q in probs.items()}
        cost = self.expected_cost(probs)
        loss = (cost / self.targets[budget_idx] - 1).abs().float()
        gates = self.gates(chosen) if hard else torch.ones(len(self.slots), device=cost.device)
        return RouterDecision(self.to_subnet(idx), probs, chosen, gates, cost, loss, budget_idx)

    def per_layer(self, axis: str, x: Tensor) -> Tensor:
        """Broadcast a homogeneous axis's value (scalar / [C]) to one row per layer of its type."""
        return x if axis in self.heterogeneous else x.expand(self.count[axis], *x.shape)

    def to_subnet(self, idx: dict[str, Tensor]) -> Subnet:
        """Choice indices per axis -> integer Subnet (depth through layer_order)."""
        def sizes(a):
            if a not in idx:
                return ()
            vals = self.choices.of(a)
            return tuple(vals[int(i)] for i in self.per_layer(a, idx[a]).reshape(-1).tolist())
        depth = self.choices.depth[int(idx["depth"])]
        kept = set(self.layer_order[:depth])
        return Subnet(self.choices.hidden[int(idx["hidden"])], sizes("mamba_heads"), sizes("mamba_head_dim"),
                      sizes("attn_heads"), sizes("ffn"), tuple(i in kept for i in range(len(self.slots))))

    def expected_sizes(self, probs: dict[str, Tensor]) -> dict[str, Tensor]:
        """sum_i probs_i x choice_i per axis (float64; per layer for layer-type axes), plus keep_prob [L]."""
        out = {}
        for a in AXES:
            if a == "depth":
                continue
            if a not in probs:
                out[a] = torch.zeros(0, dtype=torch.float64, device=self.keep_table.device)
                continue
            e = probs[a].double() @ getattr(self, f"values_{a}")
            out[a] = e if a == "hidden" else self.per_layer(a, e)
        out["keep_prob"] = probs["depth"].double() @ self.keep_table
        return out

    def expected_cost(self, probs: dict[str, Tensor]) -> Tensor:
        s = self.expected_sizes(probs)
        args = (self.m, self.vocab, s["hidden"], s["mamba_heads"], s["mamba_head_dim"], s["attn_heads"], s["ffn"],
                s["keep_prob"])
        if self.rcfg.cost == "params":
            return expected_params(*args)
        r = self.rcfg
        return expected_memory(*args, r.memory_seq_length, r.memory_batch_size, r.bytes_per_param)

    def cost_of(self, s: Subnet) -> int:
        """The exact cost of one subnet in the router's unit (parameters or bytes)."""
        r = self.rcfg
        return subnet_cost(s, self.m, self.vocab, r.cost, r.memory_seq_length, r.memory_batch_size, r.bytes_per_param)

    def fixed_subnets(self, specs: Sequence[str] = (), tp: int = 1) -> dict[int, Subnet]:
        """{budget index: subnet} for the budgets with no router choice: the full model where the target
        is at or above the parent's cost (in the router's unit), and each hand-picked `elastic.subnets`
        entry (see subnet_from_spec). Training and slicing both take their fixed subnets from here."""
        full = Subnet.full(self.m)
        parent = self.cost_of(full)
        out = {b: full for b, t in enumerate(self.targets) if t >= parent * (1 - 1e-9)}
        for b, spec in enumerate(specs):
            if spec:
                out[b] = subnet_from_spec(spec, self.m, self.layer_order, tp)
        return out

    def gates(self, chosen: dict[str, Tensor]) -> Tensor:
        """[L] straight-through gates: p / p.detach() with p the layer's chosen-probability product."""
        rows = {a: self.per_layer(a, chosen[a]) for a in self.axes if a not in ("hidden", "depth")}
        common = chosen["hidden"] * chosen["depth"]
        need = {"M": ("mamba_heads", "mamba_head_dim"), "*": ("attn_heads",), "-": ("ffn",)}
        out = []
        for kind, k in self.slots:
            p = common
            for a in need[kind]:
                p = p * rows[a][k]
            out.append(p / p.detach())
        return torch.stack(out)

    def soft_masks(self, decision: RouterDecision) -> dict[str, Tensor]:
        """Soft mode: sum_i pi_i x prefix_mask(c_i) over the full width, per axis and layer.

        hidden [H]; mamba_heads [nM, heads] (prefix inside every Mamba group, heads group-major);
        mamba_head_dim [nM, head_dim]; attn_heads [nA, heads] (prefix inside every KV group);
        ffn [nF, ffn]; depth [L] (keep probabilities)."""
        out = {}
        for a in ("hidden", "mamba_heads", "mamba_head_dim", "attn_heads", "ffn"):
            if a not in decision.probs:
                continue
            q = decision.probs[a]
            mask = q @ getattr(self, f"prefix_{a}").to(q.dtype)
            out[a] = mask if a == "hidden" else self.per_layer(a, mask)
        q = decision.probs["depth"]
        out["depth"] = q @ self.keep_table.to(q.dtype)
        return out


def build_router(cfg: RunConfig, vocab_size: int, layer_order: Optional[Sequence[int]] = None, tp: int = 1,
                 seed: Optional[int] = None) -> RouterSet:
    """RouterSet from the config tree: choices resolved for TP, budgets resolved against the parent's cost
    (fractions of the parent; counts are parameters, or bytes when router.cost=memory)."""
    m, e, r = cfg.model, cfg.elastic, cfg.router
    choices = resolve_choices(m, tp, e.hidden, e.mamba_heads, e.mamba_head_dim, e.attn_heads, e.ffn, e.depth)
    kw = dict(cost=r.cost, seq_length=r.memory_seq_length, batch_size=r.memory_batch_size,
              bytes_per_param=r.bytes_per_param)
    parent = subnet_cost(Subnet.full(m), m, vocab_size, **kw)
    smallest = subnet_cost(smallest_subnet(m, choices, layer_order), m, vocab_size, **kw)
    targets = resolve_budgets(e.budgets, parent, smallest)
    return RouterSet(m, vocab_size, choices, targets, r, e.heterogeneous, layer_order,
                     cfg.train.seed if seed is None else seed)


def router_optimizer(router: nn.Module, rcfg: RouterConfig) -> torch.optim.Adam:
    """The router's own Adam (lr router.lr), separate from the model's optimizer."""
    return torch.optim.Adam(router.parameters(), lr=rcfg.lr)


def all_reduce_router_grads(router: nn.Module, group=None, replicas: Optional[int] = None) -> None:
    """Sum router gradients over the ranks of `group` (every rank holds a replica) and divide by
    `replicas` (default: the group's size, i.e. the mean). Under pipeline parallelism each stage holds
    only its own layers' part of the gradient (and the last stage the budget loss's), so the parts
    add up: pass replicas = DP x TP, the ranks that compute the same part. A missing grad counts as
    zeros, so every rank joins the same collective. No-op without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    params = [p for p in router.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= replicas or dist.get_world_size(group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
