"""How each parameter of the hybrid model is split over tensor-parallel ranks, and a layout-free init.

Two things need the full (TP=1) view of a parameter: initialisation that gives the *same model*
for every TP x PP layout (so a parallel run reproduces the single-process losses), and moving
weights between layouts (export, slicing, Hugging Face conversion). Both use one table of rules.

Most tensors are split in contiguous chunks along one dim. Mamba's fused projections are not:
`in_proj` rows are [z | x | B | C | dt] and every rank holds its own slice of *each* block, and
`conv1d` channels are [x | B | C] likewise (megatron_cpu_notes.md §3). Attention's `linear_qkv`
is laid out per KV group ([q.., k, v] for group 0, then group 1, ...), so a plain chunk along dim 0
gives each rank whole groups.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from ..config import ModelConfig

# (suffix regex, split) where split is None (replicated), ("chunk", dim) or ("blocks", kind)
_RULES: list[tuple[str, object]] = [
    (r"word_embeddings\.weight$", ("chunk", 0)),
    (r"output_layer\.weight$", ("chunk", 0)),
    (r"mixer\.in_proj\.weight$", ("blocks", "in_proj")),
    (r"mixer\.conv1d\.(weight|bias)$", ("blocks", "conv1d")),
    (r"mixer\.(A_log|D|dt_bias)$", ("chunk", 0)),
    (r"mixer\.norm\.weight$", ("chunk", 0)),
    (r"mixer\.out_proj\.weight$", ("chunk", 1)),
    (r"linear_qkv\.weight$", ("chunk", 0)),
    (r"linear_proj\.weight$", ("chunk", 1)),
    (r"linear_fc1\.weight$", ("chunk", 0)),
    (r"linear_fc2\.weight$", ("chunk", 1)),
    (r"(norm|layernorm|layer_norm_weight|final_norm)(\.weight)?$", None),
]


def split_rule(name: str):
    for pattern, rule in _RULES:
        if re.search(pattern, name):
            return rule
    raise KeyError(f"no tensor-parallel rule for parameter '{name}'; add one to model/sharding.py")


def layer_config(name: str, m: ModelConfig) -> ModelConfig:
    """The widths that apply to parameter `name` (global name): per-layer in sliced models."""
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    return m.for_layer(int(match.group(1))) if match and m.heterogeneous else m


def blocks(kind: str, m: ModelConfig) -> list[int]:
    """Row counts of the blocks of Mamba's fused `in_proj` ([z | x | B | C | dt]) or `conv1d` ([x | B | C])."""
    d_inner = m.mamba_num_heads * m.mamba_head_dim
    bc = m.mamba_num_groups * m.mamba_state_dim
    if kind == "in_proj":
        return [d_inner, d_inner, bc, bc, m.mamba_num_heads]
    return [d_inner, bc, bc]


def shard(name: str, full: torch.Tensor, rank: int, size: int, m: ModelConfig) -> torch.Tensor:
    """This TP rank's piece of a full (TP=1) tensor."""
    rule = split_rule(name)
    if rule is None or size == 1:
        return full
    kind, arg = rule
    if kind == "chunk":
        return full.chunk(size, dim=arg)[rank]
    parts = full.split(blocks(arg, layer_config(name, m)), dim=0)
    return torch.cat([p.chunk(size, dim=0)[rank] for p in parts], dim=0)


def unshard(name: str, pieces: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from every TP rank's piece (in rank order)."""
    rule = split_rule(name)
    if rule is None or len(pieces) == 1:
        return pieces[0]
    kind, arg = rule
    if kind == "chunk":
        return torch.cat(pieces, dim=arg)
    size = len(pieces)
    local = [b // size for b in blocks(arg, layer_config(name, m))]
    split = [p.split(local, dim=0) for p in pieces]
    return torch.cat([torch.cat([s[i] for s in split], dim=0) for i in range(len(local))], dim=0)


def full_shape(name: str, local: torch.Size, size: int) -> list[int]:
    shape = list(local)
    rule = split_rule(name)
    if rule is not None:
        dim = rule[1] if rule[0] == "chunk" else 0
        shape[dim] *= size
    return shape


def init_full(name: str, shape: list[int], m: ModelConfig, seed: int) -> torch.Tensor:
    """The TP=1 initial value of one parameter, from (seed, global name) alone.

    Follows megatron's init rules: N(0, std) for inputs, N(0, std / sqrt(2 L)) for the linears that
    write into the residual stream, ones for norms and D, and the Mamba-2 A / dt / conv inits.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    std = m.init_method_std
    if re.search(r"(norm|layernorm|layer_norm_weight)(\.weight)?$", name) or name.endswith("mixer.D"):
        return torch.ones(shape)
    if name.endswith("mixer.A_log"):  # A ~ U(1, 16), as mamba-ssm
        return torch.log(torch.empty(shape).uniform_(1, 16, generator=g))
    if name.endswith("mixer.dt_bias"):  # softplus^-1 of dt ~ logU(1e-3, 1e-1), floored at 1e-4
        dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        return dt + torch.log(-torch.expm1(-dt))
    if "mixer.conv1d" in name:  # nn.Conv1d default: U(+-1/sqrt(fan_in)), fan_in = kernel width
        bound = 1.0 / math.sqrt(shape[-1] if name.endswith("weight") else 4)
        return torch.empty(shape).uniform_(-bound, bound, generator=g)
    if re.search(r"(linear_proj|linear_fc2|out_proj)\.weight$", name):
        std = std / math.sqrt(2.0 * m.num_layers)
    return torch.randn(shape, generator=g) * std
