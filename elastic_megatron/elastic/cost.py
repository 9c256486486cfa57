"""What a subnet costs: closed-form parameter count and inference memory, exact and expected.

The router's budget loss needs a *differentiable* cost of its decision. The expected versions take
float sizes (router probabilities dotted with the choice lists) and per-layer keep probabilities;
with the integer sizes of a Subnet and 0/1 keep they equal the exact versions bit for bit (float64,
every term an integer far below 2**53).

Parameters (TP=1, untied embedding and output layer; h = hidden, g = Mamba groups, n = state dim,
conv width 4), per *kept* layer:

    Mamba      h + h·(2·d_in + 2·g·n + heads) + conv·4 + conv + 3·heads + d_in + d_in·h,
               d_in = heads·head_dim, conv = d_in + 2·g·n
    attention  h + h·(q + 2·kv) + q·h,   q = heads·kv_channels, kv = kv_groups·kv_channels
    MLP        h + 2·h·ffn
    plus 2·vocab·h + h (embedding, output layer, final norm).

Memory (bytes) at sequence length S and batch B, b bytes per element:

    weights·b
    + Σ_kept attention layers  2·kv_groups·kv_channels·S·B·b                 (K and V cache)
    + Σ_kept Mamba layers      ((d_in + 2·g·n)·(4-1) + heads·head_dim·n)·B·b  (conv + SSM state)

The KV cache does not shrink with attn_heads (KV heads are always kept) nor with hidden.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..config import ConfigError, ModelConfig, parse_budget
from .subnet import AxisChoices, Subnet, homogeneous_subnet, subnet_params

CONV_WIDTH = 4  # Mamba-2 causal conv kernel width (as in subnet_params)


@lru_cache(maxsize=None)
def _type_index(pattern: str, device: torch.device) -> dict[str, Tensor]:
    """Layer positions of each type, made once per device (no host-to-device copy per call)."""
    return {c: torch.tensor([i for i, ch in enumerate(pattern) if ch == c], dtype=torch.long, device=device)
            for c in "M*-"}


def _by_type(m: ModelConfig, keep_prob: Tensor) -> dict[str, Tensor]:
    """Per-layer keep probabilities split by layer type, each in within-type order."""
    idx = _type_index(m.hybrid_override_pattern, keep_prob.device)
    return {c: keep_prob.index_select(0, i) for c, i in idx.items()}


def _f64(x) -> Tensor:
    return torch.as_tensor(x).to(torch.float64)


def expected_params(m: ModelConfig, vocab: int, hidden: Tensor, mamba_heads: Tensor, mamba_head_dim: Tensor,
                    attn_heads: Tensor, ffn: Tensor, keep_prob: Tensor) -> Tensor:
    """`subnet_params` with float sizes: hidden scalar, mamba_* [nM], attn_heads [nA], ffn [nF], keep_prob [L].

    Returns a float64 scalar. Sizes of independent routers multiply, so with sizes = E[size] this is
    the exact expected parameter count of the sampled subnet."""
    h, g, n = _f64(hidden), m.mamba_num_groups, m.mamba_state_dim
    heads, hd, a, f = _f64(mamba_heads), _f64(mamba_head_dim), _f64(attn_heads), _f64(ffn)
    keep = _by_type(m, _f64(keep_prob))
    d_in = heads * hd
    conv = d_in + 2 * g * n
    mamba = h + h * (2 * d_in + 2 * g * n + heads) + conv * CONV_WIDTH + conv + 3 * heads + d_in + d_in * h
    q, kv = a * m.kv_channels, m.num_query_groups * m.kv_channels
    attn = h + h * (q + 2 * kv) + q * h
    mlp = h + 2 * h * f
    total = 2 * vocab * h + h
    return total + (keep["M"] * mamba).sum() + (keep["*"] * attn).sum() + (keep["-"] * mlp).sum()


def expected_memory(m: ModelConfig, vocab: int, hidden: Tensor, mamba_heads: Tensor, mamba_head_dim: Tensor,
                    attn_heads: Tensor, ffn: Tensor, keep_prob: Tensor, seq_length: int, batch_size: int,
                    bytes_per_param: int) -> Tensor:
    """Inference memory in bytes (weights + KV cache + Mamba state; formula in the module doc), float64."""
    weights = expected_params(m, vocab, hidden, mamba_heads, mamba_head_dim, attn_heads, ffn, keep_prob)
    keep = _by_type(m, _f64(keep_prob))
    kv = 2 * m.num_query_groups * m.kv_channels * seq_length * batch_size
    d_in = _f64(mamba_heads) * _f64(mamba_head_dim)
    state = ((d_in + 2 * m.mamba_num_groups * m.mamba_state_dim) * (CONV_WIDTH - 1)
             + d_in * m.mamba_state_dim) * batch_size
    return (weights + kv * keep["*"].sum() + (keep["M"] * state).sum()) * bytes_per_param


def subnet_tensors(s: Subnet) -> tuple:
    """(hidden, mamba_heads, mamba_head_dim, attn_heads, ffn, keep) of `s` as float64 tensors."""
    return (_f64(s.hidden), _f64(list(s.mamba_heads)), _f64(list(s.mamba_head_dim)), _f64(list(s.attn_heads)),
            _f64(list(s.ffn)), _f64([float(k) for k in s.keep]))


def subnet_memory(s: Subnet, m: ModelConfig, vocab: int, seq_length: int, batch_size: int,
                  bytes_per_param: int) -> int:
    """Exact inference memory (bytes) of subnet `s`; the integer counterpart of `expected_memory`."""
    p = m.hybrid_override_pattern
    total = subnet_params(s, m, vocab)
    g, n = m.mamba_num_groups, m.mamba_state_dim
    slots = {c: [i for i, ch in enumerate(p) if ch == c] for c in "M*"}
    total_kv = sum(2 * m.num_query_groups * m.kv_channels * seq_length * batch_size
                   for i in slots["*"] if s.keep[i])
    total_state = 0
    for k, i in enumerate(slots["M"]):
        if s.keep[i]:
            d_in = s.mamba_heads[k] * s.mamba_head_dim[k]
            total_state += ((d_in + 2 * g * n) * (CONV_WIDTH - 1) + d_in * n) * batch_size
    return (total + total_kv + total_state) * bytes_per_param


def subnet_cost(s: Subnet, m: ModelConfig, vocab: int, cost: str = "params", seq_length: int = 1,
                batch_size: int = 1, bytes_per_param: int = 2) -> int:
    """Exact cost of `s` in the unit of `cost` ("params": parameters, "memory": bytes)."""
    if cost == "params":
        return subnet_params(s, m, vocab)
    return subnet_memory(s, m, vocab, seq_length, batch_size, bytes_per_param)


def smallest_subnet(m: ModelConfig, choices: AxisChoices, layer_order: Optional[Sequence[int]] = None) -> Subnet:
    """Every axis at its smallest choice, keeping the min-depth most important layers of `layer_order`."""
    return homogeneous_subnet(m, min(choices.hidden), min(choices.mamba_heads), min(choices.mamba_head_dim),
                              min(choices.attn_heads), min(choices.ffn),
                              layer_order=list(layer_order) if layer_order is not None else None,
                              depth=min(choices.depth))


def names_parent(text: str, parent_params: int) -> bool:
    """Whether budget `text` is a count ("12B", "2.4M") equal to the parent's size rounded to the
    decimals it is written with."""
    t = str(text).strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(t[-1:] if t else "")
    if not scale:
        return False
    digits = t[:-1]
    decimals = len(digits.split(".", 1)[1]) if "." in digits else 0
    return round(parent_params / scale, decimals) == round(float(digits), decimals)


def resolve_budgets(budget_strings: Sequence[str], parent_params: int,
                    min_params: Optional[int] = None) -> list[int]:
    """Budget strings -> integer targets: fractions x `parent_params`, counts ("6B", "2.5M") as given.

    `parent_params` is the parent's cost in the router's unit (parameters, or bytes with the memory
    cost). Raises ConfigError if a target exceeds the parent or, when `min_params` (the smallest
    possible subnet's cost) is given, is below it.

    A count that is the parent's own size at the precision it is written in names the parent: "12B"
    for a 12.31B parent, as the paper's 12B / 9B / 6B family does ("12.0B" would ask for 12.0B)."""
    out = []
    for text in budget_strings:
        v = parse_budget(text)
        target = round(v * parent_params) if isinstance(v, float) else parent_params if names_parent(text, parent_params) \
            else int(v)
        if target > parent_params:
            raise ConfigError(f"config key 'elastic.budgets': budget {text} = {target:,} exceeds the parent model "
                              f"({parent_params:,}); use a fraction <= 1 or a smaller count")
        if min_params is not None and target < min_params:
            raise ConfigError(f"config key 'elastic.budgets': budget {text} = {target:,} is below the smallest "
                              f"possible subnet ({min_params:,}); raise it or add smaller choices in elastic.*")
        out.append(target)
    return out
