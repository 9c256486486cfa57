"""Memory planner: what one GPU holds in parent training and in each elastic curriculum stage.

    elastic-megatron plan --config nemotron_nano_12b_v2 --gpu-memory 80GB --nodes 8 --gpus-per-node 8

For every TP x PP x DP layout the world size allows (TP inside a node, the shapes divisible), it
adds up per rank, for the worst pipeline stage:

    weights        this stage's parameters / TP (norms replicated) x bytes of the run dtype
    main grads     the same count in fp32 (megatron DDP accumulates into fp32 `main_grad`)
    optimizer      fp32 master copy (bf16 runs) + Adam's two moments = 12 (bf16) or 8 (fp32) bytes
                   per parameter, divided by DP with the distributed optimizer
    teacher        elastic training only: a second copy of the weights (no grads, no optimizer)
    activations    what the elastic forward keeps for the backward, per token and layer (counted
                   from elastic/model.py's layer functions, below), x tokens per micro-batch x the
                   micro-batches in flight on the stage under 1F1B (min(PP - stage, micro-batches));
                   with train.recompute=full only each layer's input, plus one layer rebuilt at a time
    logits         the last stage's vocab-parallel logits [s, b, V/TP] and the fp32 buffers of the
                   cross-entropy and (elastic) the KD softmaxes and their gradient
    p2p            send and receive buffers between stages (elastic: student and teacher side by side)
    runtime        CUDA context, NCCL and allocator slack: a fixed allowance (--overhead)

The full-size budget is the largest subnet, so the parent's shapes bound every budget. Not
modelled: the backward's transient working set beyond the one recomputed layer (on CPU, with the
pure-PyTorch scan, measured at 1.5-2x the saved activations; docs/performance.md), and sequence
parallelism (not implemented; docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import ConfigError, RunConfig
from .parallel import stage_sizes

GiB = 2**30


def parse_bytes(text: str, flag: str = "--gpu-memory") -> int:
    """"80GB" / "141GB" / "80GiB" / "8e10" -> bytes (GB read as GiB, as GPU memory is quoted)."""
    t = str(text).strip().upper().replace("IB", "B")
    scale = {"TB": 2**40, "GB": GiB, "MB": 2**20, "KB": 2**10}
    for suffix, mult in scale.items():
        if t.endswith(suffix):
            return int(float(t[:-len(suffix)]) * mult)
    try:
        return int(float(t))
    except ValueError:
        raise ConfigError(f"{flag} '{text}': give a size such as 80GB, 5GB or 500MB") from None


def layer_params(cfg: RunConfig, kind: str) -> tuple[int, int]:
    """(parameters split over TP, parameters replicated over TP) of one layer of `kind`."""
    m = cfg.model
    h, g, n = m.hidden_size, m.mamba_num_groups, m.mamba_state_dim
    if kind == "M":
        d, heads = m.mamba_num_heads * m.mamba_head_dim, m.mamba_num_heads
        conv = d + 2 * g * n
        return h * (2 * d + 2 * g * n + heads) + conv * 5 + 3 * heads + d + d * h, h
    if kind == "*":
        q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
        return h * (q + 2 * kv) + q * h, h
    return 2 * h * m.ffn_hidden_size, h


def layer_activation_bytes(cfg: RunConfig, kind: str, tp: int, bw: int) -> float:
    """Bytes the elastic forward saves for the backward per token of one layer (full width).

    Counted from elastic/model.py: every layer keeps its input, the pre-norm's output (the input
    of the first projection) and its gated output (for the router's straight-through gate);
    Mamba also the in_proj output, the conv's input and output (SiLU), the scan's output, the
    gated norm's output and fp32 dt; attention the QKV output, K and V repeated to every query
    head, the attention output (+ its fp32 log-sum-exp); the MLP the fc1 output, ReLU and its
    square. TP-split tensors count 1/TP."""
    m = cfg.model
    h, g, n = m.hidden_size, m.mamba_num_groups, m.mamba_state_dim
    common = 3 * h * bw
    if kind == "M":
        d, heads = m.mamba_num_heads * m.mamba_head_dim, m.mamba_num_heads
        split = (2 * d + 2 * g * n + heads) + 2 * (d + 2 * g * n) + 3 * d
        return common + split * bw / tp + 2 * heads * 4 / tp
    if kind == "*":
        q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
        return common + (q + 2 * kv + 2 * q + q) * bw / tp + m.num_attention_heads * 4 / tp
    return common + 3 * m.ffn_hidden_size * bw / tp


@dataclass
class Phase:
    """One thing to fit: parent training or one curriculum stage."""

    name: str
    seq: int
    micro_batch: int
    global_batch: int
    elastic: bool


def phases(cfg: RunConfig) -> list[Phase]:
    t = cfg.train
    out = [Phase("parent train", cfg.data.seq_length, t.micro_batch_size, t.global_batch_size, False)]
    for st in cfg.curriculum:
        out.append(Phase(f"elastic {st.name}", st.seq_length or cfg.data.seq_length,
                         st.micro_batch_size or t.micro_batch_size, st.global_batch_size or t.global_batch_size, True))
    return out


def rank_memory(cfg: RunConfig, vocab: int, tp: int, pp: int, dp: int, ph: Phase, recompute: str,
                distributed_optimizer: bool, bw: int) -> dict[str, float]:
    """Bytes per rank, by term, on the pipeline stage that needs the most."""
    m = cfg.model
    pattern = m.hybrid_override_pattern
    sizes = stage_sizes(len(pattern), pp, None, None)  # even stages (uneven splits: see the config's own)
    tokens = ph.seq * ph.micro_batch
    n_micro = max(1, ph.global_batch // (ph.micro_batch * dp))
    worst: dict[str, float] = {}
    start = 0
    for stage, size in enumerate(sizes):
        kinds = pattern[start:start + size]
        start += size
        params = 0.0
        for k in kinds:
            split, repl = layer_params(cfg, k)
            params += split / tp + repl
        if stage == 0:
            params += vocab * m.hidden_size / tp
        if stage == pp - 1:
            params += vocab * m.hidden_size / tp + m.hidden_size
        per_layer = [layer_activation_bytes(cfg, k, tp, bw) for k in kinds]
        in_flight = min(pp - stage, n_micro)
        if recompute == "full":
            act = (len(kinds) * m.hidden_size * bw * tokens) * in_flight + max(per_layer) * tokens
        else:
            act = sum(per_layer) * tokens * in_flight
        if ph.elastic:  # the teacher runs under no_grad: one layer's tensors at a time
            act += max(per_layer) * tokens
        logits = 0.0
        if stage == pp - 1:
            per = (2 * bw + 16) if ph.elastic else (bw + 12)
            logits = tokens * vocab / tp * per
        p2p = 2 * tokens * m.hidden_size * (2 if ph.elastic else 1) * bw * 2 if pp > 1 else 0.0
        opt_per_param = 12 if bw == 2 else 8
        terms = {
            "weights": params * bw,
            "main_grads": params * 4,
            "optimizer": params * opt_per_param / (dp if distributed_optimizer else 1),
            "teacher": params * bw if ph.elastic else 0.0,
            "activations": act,
            "logits": logits,
            "p2p": p2p,
        }
        if not worst or sum(terms.values()) > sum(worst.values()):
            worst = terms | {"stage": stage}
    return worst


def candidate_layouts(cfg: RunConfig, world: int, gpus_per_node: int) -> list[tuple[int, int, int]]:
    m = cfg.model
    out = []
    tp = 1
    while tp <= min(gpus_per_node, world):
        ok = all(x % tp == 0 for x in (m.num_query_groups, m.mamba_num_groups, m.ffn_hidden_size,
                                       m.num_attention_heads, m.mamba_num_heads))
        pp = 1
        while ok and tp * pp <= world and pp <= len(m.hybrid_override_pattern):
            try:
                stage_sizes(len(m.hybrid_override_pattern), pp, None, None)  # an even split exists
            except ConfigError:
                pp *= 2
                continue
            if world % (tp * pp) == 0:
                out.append((tp, pp, world // (tp * pp)))
            pp *= 2
        tp *= 2
    return out


def plan(cfg: RunConfig, vocab: int, gpu_memory: int, nodes: int = 1, gpus_per_node: int = 8,
         overhead: int = 3 * GiB) -> list[dict]:
    """One row per (layout, phase, optimizer sharding): the terms in GiB, the total, whether it fits."""
    bw = 2 if cfg.train.precision in ("bf16", "auto") else 4  # auto is bf16 on the GPUs this plans for
    world = nodes * gpus_per_node
    rows = []
    for tp, pp, dp in candidate_layouts(cfg, world, gpus_per_node):
        for ph in phases(cfg):
            if ph.global_batch % (ph.micro_batch * dp):
                continue  # this DP size does not divide the batch
            for dist_opt in (False, True):
                terms = rank_memory(cfg, vocab, tp, pp, dp, ph, cfg.train.recompute, dist_opt, bw)
                stage = terms.pop("stage")
                total = sum(terms.values()) + overhead
                rows.append({"tp": tp, "pp": pp, "dp": dp, "phase": ph.name, "seq": ph.seq,
                             "distributed_optimizer": dist_opt, "recompute": cfg.train.recompute, "stage": stage,
                             **{k: v / GiB for k, v in terms.items()}, "runtime": overhead / GiB,
                             "total": total / GiB, "fits": total <= gpu_memory})
    return rows


def format_plan(rows: list[dict], gpu_memory: int) -> str:
    cols = ["weights", "main_grads", "optimizer", "teacher", "activations", "logits", "p2p", "runtime", "total"]
    head = f"{'TP':>3} {'PP':>3} {'DP':>4} {'phase':<16} {'seq':>6} {'dist-opt':>8} {'recomp':>6} " + \
        " ".join(f"{c:>11}" for c in cols) + "  fits"
    lines = [f"per-rank memory in GiB (GPU memory {gpu_memory / GiB:.0f} GiB; worst pipeline stage)", head]
    for r in rows:
        lines.append(f"{r['tp']:>3} {r['pp']:>3} {r['dp']:>4} {r['phase']:<16} {r['seq']:>6} "
                     f"{'yes' if r['distributed_optimizer'] else 'no':>8} {r['recompute']:>6} "
                     + " ".join(f"{r[c]:>11.1f}" for c in cols) + ("  yes" if r["fits"] else "  NO"))
    return "\n".join(lines)


def plan_both_recompute(cfg: RunConfig, vocab: int, gpu_memory: int, nodes: int, gpus_per_node: int,
                        overhead: int) -> list[dict]:
    """The plan with and without activation recomputation."""
    rows = []
    for mode in ("none", "full"):
        rows += plan(replace(cfg, train=replace(cfg.train, recompute=mode)), vocab, gpu_memory, nodes, gpus_per_node,
                     overhead)
    return rows
