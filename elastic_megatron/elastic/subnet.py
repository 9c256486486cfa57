"""Axes, choices and the subnet: what a sub-network of the parent is, as plain data.

Vocabulary: an *axis* is one elastic dimension (hidden, mamba_heads, mamba_head_dim, attn_heads,
ffn, depth); a *choice* is one allowed size on an axis; a *subnet* is one choice per axis and
per layer. After sorting (elastic/sorting.py) every subnet is a prefix of the parent:

    hidden          first `hidden` channels of the residual stream (one value model-wide)
    mamba_heads     first `mamba_heads / groups` heads *inside every Mamba group* (B/C untouched)
    mamba_head_dim  first `mamba_head_dim` channels of every kept head
    attn_heads      first `attn_heads / kv_groups` query heads inside every KV group (KV kept)
    ffn             first `ffn` intermediate neurons of each MLP layer (heterogeneous)
    depth           keep[i] = False makes layer i the identity

All sizes are global (TP=1) counts. Per-layer tuples are indexed by layer position *within
their layer type* (the k-th Mamba layer, the k-th MLP layer, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError, ModelConfig

AXES = ("hidden", "mamba_heads", "mamba_head_dim", "attn_heads", "ffn", "depth")


@dataclass(frozen=True)
class Subnet:
    hidden: int
    mamba_heads: tuple[int, ...]  # one per Mamba layer
    mamba_head_dim: tuple[int, ...]  # one per Mamba layer
    attn_heads: tuple[int, ...]  # one per attention layer
    ffn: tuple[int, ...]  # one per MLP layer
    keep: tuple[bool, ...]  # one per layer of the pattern

    @staticmethod
    def full(m: ModelConfig) -> "Subnet":
        p = m.hybrid_override_pattern
        return Subnet(
            hidden=m.hidden_size,
            mamba_heads=(m.mamba_num_heads,) * p.count("M"),
            mamba_head_dim=(m.mamba_head_dim,) * p.count("M"),
            attn_heads=(m.num_attention_heads,) * p.count("*"),
            ffn=(m.ffn_hidden_size,) * p.count("-"),
            keep=(True,) * len(p),
        )

    def is_within(self, other: "Subnet") -> bool:
        """Nested: every size <= the other's and every kept layer kept there too."""
        pairs = [((self.hidden,), (other.hidden,)), (self.mamba_heads, other.mamba_heads),
                 (self.mamba_head_dim, other.mamba_head_dim), (self.attn_heads, other.attn_heads),
                 (self.ffn, other.ffn)]
        sizes_ok = all(a <= b for mine, theirs in pairs for a, b in zip(mine, theirs, strict=True))
        return sizes_ok and all(b or not a for a, b in zip(self.keep, other.keep, strict=True))

    def to_dict(self) -> dict:
        return {"hidden": self.hidden, "mamba_heads": list(self.mamba_heads),
                "mamba_head_dim": list(self.mamba_head_dim), "attn_heads": list(self.attn_heads),
                "ffn": list(self.ffn), "keep": [bool(k) for k in self.keep]}

    @staticmethod
    def from_dict(d: dict) -> "Subnet":
        return Subnet(int(d["hidden"]), tuple(d["mamba_heads"]), tuple(d["mamba_head_dim"]),
                      tuple(d["attn_heads"]), tuple(d["ffn"]), tuple(bool(k) for k in d["keep"]))


def layer_slots(pattern: str) -> list[tuple[str, int]]:
    """For each layer: (type char, index within its type). "M-M*" -> [(M,0), (-,0), (M,1), (*,0)]."""
    seen: dict[str, int] = {}
    out = []
    for c in pattern:
        out.append((c, seen.get(c, 0)))
        seen[c] = seen.get(c, 0) + 1
    return out


@dataclass(frozen=True)
class AxisChoices:
    """Allowed sizes per axis (descending, the full size first); depth = number of layers kept."""

    hidden: tuple[int, ...]
    mamba_heads: tuple[int, ...]
    mamba_head_dim: tuple[int, ...]
    attn_heads: tuple[int, ...]
    ffn: tuple[int, ...]
    depth: tuple[int, ...]

    def of(self, axis: str) -> tuple[int, ...]:
        return getattr(self, axis)


def _resolve(axis: str, values: list, full: int, multiple: int, what: str) -> tuple[int, ...]:
    """Fractions (0 < f <= 1) or integers -> sorted unique integers, each a valid size."""
    out = set()
    for v in values or [1.0]:
        n = round(float(v) * full) if isinstance(v, float) and v <= 1.0 else int(v)
        if not 0 < n <= full:
            raise ConfigError(f"config key 'elastic.{axis}': choice {v} gives {n}, outside 1..{full}")
        if n % multiple:
            raise ConfigError(f"config key 'elastic.{axis}': choice {v} gives {n} {what}, not a multiple of "
                              f"{multiple}; pick sizes divisible by {multiple}")
        out.add(n)
    out.add(full)
    return tuple(sorted(out, reverse=True))


def resolve_choices(m: ModelConfig, tp: int, hidden: list, mamba_heads: list, mamba_head_dim: list,
                    attn_heads: list, ffn: list, depth: list) -> AxisChoices:
    """Validate the configured choices against TP and group divisibility; always include the full size.

    - mamba heads: a multiple of mamba_num_groups (equal heads per group) and of TP
    - attention heads: a multiple of num_query_groups (equal heads per KV group) and of TP
    - ffn: a multiple of TP (every shard keeps the same count)
    - hidden, mamba head dim, depth: any size (hidden is replicated across TP)
    """
    lcm = lambda a, b: a * b // __import__("math").gcd(a, b)  # noqa: E731
    n_layers = m.num_layers
    return AxisChoices(
        hidden=_resolve("hidden", hidden, m.hidden_size, 1, "channels"),
        mamba_heads=_resolve("mamba_heads", mamba_heads, m.mamba_num_heads, lcm(m.mamba_num_groups, tp),
                             "heads (groups x TP)"),
        mamba_head_dim=_resolve("mamba_head_dim", mamba_head_dim, m.mamba_head_dim, 1, "channels"),
        attn_heads=_resolve("attn_heads", attn_heads, m.num_attention_heads, lcm(m.num_query_groups, tp),
                            "heads (KV groups x TP)"),
        ffn=_resolve("ffn", ffn, m.ffn_hidden_size, tp, "neurons (TP)"),
        depth=_resolve("depth", depth, n_layers, 1, "layers"),
    )


def homogeneous_subnet(m: ModelConfig, hidden: int, mamba_heads: int, mamba_head_dim: int, attn_heads: int,
                       ffn: int, layer_order: Optional[list[int]] = None, depth: Optional[int] = None) -> Subnet:
    """One size per axis for every layer; depth keeps the first `depth` layers of `layer_order`
    (most important first; default: keep all)."""
    p = m.hybrid_override_pattern
    keep = [True] * len(p)
    if depth is not None and depth < len(p):
        order = layer_order if layer_order is not None else list(range(len(p)))
        kept = set(order[:depth])
        keep = [i in kept for i in range(len(p))]
    return Subnet(hidden, (mamba_heads,) * p.count("M"), (mamba_head_dim,) * p.count("M"),
                  (attn_heads,) * p.count("*"), (ffn,) * p.count("-"), tuple(keep))


def check_subnet(s: Subnet, m: ModelConfig, tp: int = 1) -> None:
    """Raise ConfigError unless `s` is a valid subnet of the parent `m` under TP `tp`."""
    p = m.hybrid_override_pattern
    counts = {"mamba_heads": p.count("M"), "mamba_head_dim": p.count("M"), "attn_heads": p.count("*"),
              "ffn": p.count("-"), "keep": len(p)}
    for name, n in counts.items():
        if len(getattr(s, name)) != n:
            raise ConfigError(f"subnet.{name}: expected {n} entries, got {len(getattr(s, name))}")
    bad = lambda name, msg: ConfigError(f"subnet.{name}: {msg}")  # noqa: E731
    if not 0 < s.hidden <= m.hidden_size:
        raise bad("hidden", f"{s.hidden} outside 1..{m.hidden_size}")
    for h in s.mamba_heads:
        if not 0 < h <= m.mamba_num_heads or h % m.mamba_num_groups or h % tp:
            raise bad("mamba_heads", f"{h} must be in 1..{m.mamba_num_heads}, a multiple of groups "
                                     f"{m.mamba_num_groups} and of TP {tp}")
    for d in s.mamba_head_dim:
        if not 0 < d <= m.mamba_head_dim:
            raise bad("mamba_head_dim", f"{d} outside 1..{m.mamba_head_dim}")
    for h in s.attn_heads:
        if not 0 < h <= m.num_attention_heads or h % m.num_query_groups or h % tp:
            raise bad("attn_heads", f"{h} must be in 1..{m.num_attention_heads}, a multiple of KV groups "
                                    f"{m.num_query_groups} and of TP {tp}")
    for f in s.ffn:
        if not 0 < f <= m.ffn_hidden_size or f % tp:
            raise bad("ffn", f"{f} must be in 1..{m.ffn_hidden_size} and a multiple of TP {tp}")
    if not any(s.keep):
        raise bad("keep", "at least one layer must be kept")


def subnet_params(s: Subnet, m: ModelConfig, vocab_size: int) -> int:
    """Parameter count of the sliced standalone model for subnet `s` (closed form, TP=1)."""
    h, n, g, conv_w = s.hidden, m.mamba_state_dim, m.mamba_num_groups, 4
    total = 2 * vocab_size * h + h  # embeddings, output layer, final norm
    for i, (kind, k) in enumerate(layer_slots(m.hybrid_override_pattern)):
        if not s.keep[i]:
            continue
        if kind == "M":
            heads, hd = s.mamba_heads[k], s.mamba_head_dim[k]
            d_in = heads * hd
            conv = d_in + 2 * g * n
            total += h + h * (2 * d_in + 2 * g * n + heads) + conv * conv_w + conv + 3 * heads + d_in + d_in * h
        elif kind == "*":
            q, kv = s.attn_heads[k] * m.kv_channels, m.num_query_groups * m.kv_channels
            total += h + h * (q + 2 * kv) + q * h
        else:
            total += h + 2 * h * s.ffn[k]
    return total


def nest_family(subnets: list[Subnet]) -> list[Subnet]:
    """Make a family nested (invariant 3): each subnet, in the given order (largest budget first),
    is clipped elementwise to the one before it; a layer is kept only if every larger one keeps it.
    A router-chosen family is nested already when its choices are monotone; this enforces it."""
    out: list[Subnet] = []
    for s in subnets:
        if out:
            p = out[-1]
            mn = lambda a, b: tuple(min(x, y) for x, y in zip(a, b))  # noqa: E731
            s = Subnet(min(s.hidden, p.hidden), mn(s.mamba_heads, p.mamba_heads),
                       mn(s.mamba_head_dim, p.mamba_head_dim), mn(s.attn_heads, p.attn_heads), mn(s.ffn, p.ffn),
                       tuple(a and b for a, b in zip(s.keep, p.keep)))
        out.append(s)
    return out


def subnet_from_spec(spec: str, m: ModelConfig, layer_order: Optional[list[int]] = None, tp: int = 1,
                     key: str = "elastic.subnets") -> Subnet:
    """A hand-picked subnet, from either

    - a JSON file: `subnet.json` written by `elastic-megatron slice` (its "subnet" entry), or a
      bare `Subnet.to_dict()`; or
    - a homogeneous spec "hidden=0.75,mamba_heads=0.5,attn_heads=0.5,ffn=0.5,depth=0.9": per axis a
      fraction of the parent (0 < f <= 1, written with a dot) or an integer size; axes left out stay
      full; depth keeps the most important layers of `layer_order`.
    """
    import json
    from pathlib import Path

    if spec.endswith(".json"):
        if not Path(spec).exists():
            raise ConfigError(f"config key '{key}': no such subnet file {spec}")
        d = json.loads(Path(spec).read_text())
        s = Subnet.from_dict(d.get("subnet", d))
    else:
        full = {"hidden": m.hidden_size, "mamba_heads": m.mamba_num_heads, "mamba_head_dim": m.mamba_head_dim,
                "attn_heads": m.num_attention_heads, "ffn": m.ffn_hidden_size, "depth": m.num_layers}
        sizes = dict(full)
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in full:
                raise ConfigError(f"config key '{key}': unknown axis {name!r} in {spec!r}; axes are {', '.join(AXES)}")
            try:
                v = float(value) if "." in value else int(value)
            except ValueError:
                raise ConfigError(f"config key '{key}': {item!r} needs a number (a fraction like 0.5 or a size)")
            sizes[name] = round(v * full[name]) if isinstance(v, float) else v
        if not 0 < sizes["depth"] <= m.num_layers:
            raise ConfigError(f"config key '{key}': depth {sizes['depth']} outside 1..{m.num_layers}")
        s = homogeneous_subnet(m, sizes["hidden"], sizes["mamba_heads"], sizes["mamba_head_dim"], sizes["attn_heads"],
                               sizes["ffn"], layer_order, sizes["depth"])
    try:
        check_subnet(s, m, tp)
    except ConfigError as e:
        raise ConfigError(f"config key '{key}': {spec!r} is not a valid subnet of this parent: {e}") from None
    return s


def homogeneous_for_target(m: ModelConfig, vocab_size: int, target: float, tp: int = 1, tol: float = 0.01,
                           hidden_multiple: int = 8, ffn_multiple: int = 32) -> Subnet:
    """The hand-picked baseline at a parameter target: one width per axis for every layer, all layers
    and the full Mamba head dim kept. Among the subnets within `tol` of the target, the most balanced
    (smallest spread between the hidden, Mamba-head, attention-head and FFN fractions) wins; ties go
    to the closest size. Without any within `tol`, the closest one."""
    import itertools
    import math

    lcm = lambda a, b: a * b // math.gcd(a, b)  # noqa: E731
    grid = lambda full, mult: range(mult, full + 1, mult)  # noqa: E731
    best, best_key = None, None
    for h, mh, ah, f in itertools.product(grid(m.hidden_size, hidden_multiple),
                                          grid(m.mamba_num_heads, lcm(m.mamba_num_groups, tp)),
                                          grid(m.num_attention_heads, lcm(m.num_query_groups, tp)),
                                          grid(m.ffn_hidden_size, lcm(ffn_multiple, tp))):
        s = homogeneous_subnet(m, h, mh, m.mamba_head_dim, ah, f)
        err = abs(subnet_params(s, m, vocab_size) / target - 1)
        fr = (h / m.hidden_size, mh / m.mamba_num_heads, ah / m.num_attention_heads, f / m.ffn_hidden_size)
        key = (err > tol, max(fr) - min(fr) if err <= tol else err, err)
        if best_key is None or key < best_key:
            best, best_key = s, key
    return best
