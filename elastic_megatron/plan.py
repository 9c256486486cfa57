"""Memory planner: what one GPU holds in parent training and in each elastic curriculum stage.

    elastic-megatron plan --config nemotron_nano_12b_v2 --gpu-memory 80GB --nodes 8 --gpus-per-node 8

For every TP x PP x DP layout the world size allows (TP inside a node, the shapes divisible), it
adds up per rank, for the worst pipeline stage:

    weights        this stage's parameters / TP (norms replicated) x bytes of the run dtype
    main grads     the same count in fp32 (megatron DDP accumulates into fp32 `main_grad`)
    optimizer      fp32 master copy (bf16 runs) + Adam's two moments = 12 (bf16) or 8 (fp32) bytes
                   per parameter, divided by DP with the distributed optimizer
    teacher        elastic training only: a second copy of the weights (no grads, no optimizer)
    activations    what autograd holds at the forward/backward turn: each layer's saved tensors (per
                   token, counted from the code in `layer_bytes`) x tokens per micro-batch x the micro-
                   batches in flight on the stage under 1F1B (min(PP - stage, micro-batches)); with
                   train.recompute=full only each layer's input; plus the last stage's final norm
    logits         the loss's tensors held at the turn (fp32 log-softmaxes of KD, CE's softmax)
    backward       the transient working set on top of those, the largest of: one layer's forward
                   (alive, not saved), the teacher's forward of one layer (no autograd), the loss (fp32
                   logits copies, KD / CE buffers) and each layer's backward (activation gradients and
                   kernel workspace); with recompute=full a layer's rebuilt saved tensors too; less what
                   the layers after it and the loss have not made yet / freed already
    p2p            send and receive buffers between stages (elastic: student and teacher side by side)
    runtime        CUDA context, NCCL and allocator slack: a fixed allowance (--overhead)

`kernels`: "fused" (default, a GPU run) is mamba-ssm's triton SSD scan, which saves its bf16
inputs and output and whose fp32 workspace is state-sized ([chunks, heads, p, n]), and torch's
fused CUDA RMSNorm: counted from mamba-ssm 2.x's code, not measured here. "torch" is the CPU
fallback: compat/mamba_kernels.py's pure-PyTorch scan (fp32 [b, chunks, heads, Q, Q] and [b, l,
heads, p] intermediates for every head at once) and torch's composite RMSNorm (fp32 copies);
benchmarks/plan_check.py measures those.

The full-size budget runs as a fixed subnet (no router gate), the largest hard subnet, so the
parent's shapes bound every budget in hard mode. A stage whose router learns in soft mode
(`router: learn` with elastic.mode=soft, the default recipe's stage 1) runs its other budgets at
full width with prefix masks, where every masked product saves its input for the router's gradient
(`soft=True` below); the planner counts every in-flight micro-batch of such a stage as a soft one.
Sequence parallelism (parallel.sequence_parallel) splits the residual stream, the norms, the layer
outputs and the p2p tensors over TP (`sp` below). Not modelled: parent training through megatron's
own mixer (counted with the elastic layer functions) and allocator fragmentation (in --overhead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .compat.mamba_kernels import CPU_CHUNK
from .config import ConfigError, RunConfig
from .parallel import stage_sizes

GiB = 2**30
TERMS = ("weights", "main_grads", "optimizer", "teacher", "activations", "logits", "backward", "p2p")


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


FUSED_CHUNK = 128  # megatron MambaMixer's chunk_size: mamba-ssm's scan works on chunks this long
CONV_WIDTH = 4  # MambaMixer's d_conv


@dataclass
class LayerBytes:
    """Bytes per token of one layer at full width on one TP rank (TP-split tensors count 1/TP)."""

    saved: float  # what autograd keeps for the backward
    live: float  # alive in the forward with autograd on but not saved (gone when the layer returns)
    nograd: float  # all that is alive at the forward's peak without autograd (the teacher)
    grads: float  # activation gradients and kernel workspace alive at once in the layer's backward


def norm_bytes(h: int, bw: int, fused: bool, soft: bool = False, sp: int = 1) -> float:
    """F.rms_norm's saved tensors: the input + fp32 rstd (fused CUDA kernel) or an fp32 copy of the input +
    the fp32 normalised tensor (CPU composite); then the bf16 output, which the next projection saves.
    soft: the masked norm of elastic/masked_norm.py (every device): its input and fp32 rstd; then the output.
    sp: sequence parallelism's split (TP, else 1): the norm runs on 1/sp of the tokens, its output is
    all-gathered for the projection, which saves the whole sequence."""
    if soft:
        return (bw * h + 4) / sp + bw * h
    return ((bw * h if fused else 8 * h) + 4) / sp + bw * h


def layer_bytes(cfg: RunConfig, kind: str, tp: int, bw: int, seq: int, kernels: str = "fused",
                soft: bool = False, sp: int = 1) -> LayerBytes:
    """One layer of elastic/model.py's forward (`_mamba`, `_attention`, `_mlp`), counted from its code.
    soft: the layer under soft masks (full width, every mask a learned tensor; see `_soft_layer_bytes`).
    sp: TP under sequence parallelism, else 1: the [s, b, h] tensors outside the projections (the
    residual stream, the norms, the layer's output) are 1/sp per rank; the mixers see the whole
    sequence (all-gathered) and are unchanged."""
    hard = _hard_layer_bytes(cfg, kind, tp, bw, seq, kernels, sp)
    return _soft_layer_bytes(cfg, kind, tp, bw, seq, kernels, hard, sp) if soft else hard


def _soft_layer_bytes(cfg: RunConfig, kind: str, tp: int, bw: int, seq: int, kernels: str,
                      hard: LayerBytes, sp: int = 1) -> LayerBytes:
    """A full-width layer under soft masks (elastic/model.py with `masks`). A product with a mask that
    requires grad saves its other input; the masked norms (elastic/masked_norm.py) save their input
    and rstd only. Against the hard layer:
      every layer   the masked pre-norm (`norm_bytes(soft=True)` in place of the plain one), and the
                    output x (hidden mask x keep probability x gate): the output, saved once (`_layer`)
      Mamba         x x channel mask: the fused scan saves the masked copy; the CPU scan, which saves
                    fp32 copies only, now leaves the SiLU output saved (the mask's product needs it);
                    the gated group norm saves the scan's output, fp32 rstd per group and (through
                    out_proj) its output, where the plain one also keeps y * rstd
      attention     context x head mask: out_proj's input is a new copy
      MLP           squared ReLU x FFN mask: fc2's input is a new copy
    At the layer's forward peak (in the scan) the masked x exists and the group norm's and the
    output's tensors not yet. The masked norms' backward recomputes in fp32: at most four
    [tokens, channels] fp32 temporaries at once, the group norm's after out_proj's input is freed;
    each masked product's gradient replaces the saved input it frees."""
    m, fused = cfg.model, kernels == "fused"
    h = m.hidden_size
    out = bw * h / sp  # the layer's output (this rank's part of the sequence)
    common = norm_bytes(h, bw, fused, True, sp) - norm_bytes(h, bw, fused, False, sp) + out
    norm_bwd = (16 * h + bw * h) / sp  # the pre-norm's backward: fp32 temporaries, then dx
    if kind == "M":
        P, G = m.mamba_num_heads // tp * m.mamba_head_dim, m.mamba_num_groups // tp * m.mamba_state_dim
        gl = m.mamba_num_groups // tp
        post_hard = 3 * bw * P + bw * gl  # `_hard_layer_bytes`' group norm: y, y * rstd, out_proj's input
        post = 2 * bw * P + 4 * gl  # y (saved by the masked norm), rstd, out_proj's input
        masked_x = bw * P if fused else bw * (P + 2 * G)
        after_peak = post + out - post_hard  # made after the scan (y exists in both): soft minus hard
        alive = 0 if fused else -2 * bw * G  # CPU: the masked x is alive, the SiLU output now saved
        grads = max(hard.grads, 16 * P + bw * h / sp, norm_bwd)  # dx replaces out_proj's freed input
        return LayerBytes(hard.saved + common + masked_x + post - post_hard, hard.live + alive - after_peak,
                          hard.nograd, grads)
    width = m.num_attention_heads // tp * m.kv_channels if kind == "*" else m.ffn_hidden_size // tp
    return LayerBytes(hard.saved + common + bw * width, hard.live + bw * width, hard.nograd,
                      max(hard.grads, norm_bwd))


def _hard_layer_bytes(cfg: RunConfig, kind: str, tp: int, bw: int, seq: int, kernels: str, sp: int = 1) -> LayerBytes:
    """One layer at full width in hard mode (a fixed subnet: no mask, no learned gate)."""
    m, fused = cfg.model, kernels == "fused"
    h = m.hidden_size
    norm, resid = norm_bytes(h, bw, fused, False, sp), bw * h / sp  # resid: the residual stream's gradient
    x_in = bw * h / sp  # the layer's input (the teacher's residual stream)
    if kind == "M":
        hh, p, n, gl = m.mamba_num_heads // tp, m.mamba_head_dim, m.mamba_state_dim, m.mamba_num_groups // tp
        P, G = hh * p, gl * n  # x / z channels and B (or C) channels on this rank
        Q = FUSED_CHUNK if fused else min(FUSED_CHUNK, CPU_CHUNK)
        c = math.ceil(seq / Q)
        pad = c * Q / seq  # chunked tensors cover the padded length
        st = P * n / seq  # one [heads, p, n] chunk state, elements per token of the sequence
        zx = bw * (2 * P + 2 * G + hh)  # in_proj output [z | x | B | C | dt]
        xbc = bw * (P + 2 * G)  # SiLU(conv) output: the scan's x, B, C
        conv = xbc * ((seq + CONV_WIDTH - 1) / seq + 1)  # _causal_conv: padded input copy, output (SiLU's input)
        post = 3 * bw * P + bw * gl  # group_rms_norm: y, y * rsqrt, out_proj's input; rsqrt per group
        early = post - bw * P  # saved after the scan's peak (all but y)
        norm_bwd = 5 * bw * P  # group_rms_norm's backward (pow, mean, mul): the layer's first peak
        if fused:
            # MambaChunkScanCombinedFn.save_for_backward(out_x, x, dt, dA_cumsum, B, C, z, ..): x, B, C
            # are views of the SiLU output and z, dt of the in_proj output, so both stay; out_x (the
            # pre-gate output, bf16), dA_cumsum fp32 [b, h, c, Q]
            scan = zx + xbc + bw * P + 4 * hh * pad
            # _mamba_chunk_scan_combined_fwd: dt fp32, the chunk states fp32 [b, c, h, p, n] and passed
            # on in bf16, CB fp32 [b, c, g, Q, Q] (out and out_x are counted as saved)
            work = 4 * hh * pad + (4 + bw) * c * st + 4 * gl * Q * pad
            live = work - early  # the layer's peak is in the scan, before the group norm
            nograd = x_in + zx + xbc + 2 * bw * P + 4 * hh * pad + work
            # _mamba_chunk_scan_combined_bwd: dout, dz, the gated dout, dx; dB, dC and their outputs;
            # recomputed chunk and passed states and dstates (fp32, plus bf16 copies of two); CB, dCB
            # fp32; dt, dA_cumsum, ddt, ddA fp32
            scan_bwd = 4 * bw * P + 4 * bw * G + (12 + 2 * bw) * c * st + 8 * gl * Q * pad + 16 * hh * pad
        else:
            # compat/mamba_kernels.py mamba_chunk_scan_combined, what autograd saves (fp32):
            scan = (4 * 4 * P  # x.to(fp32), z.to(fp32), silu(z), y + x * D  [b, l, h, p]
                    + 4 * 4 * P * pad  # X = x * dt padded, its permuted copy for `@ X`, (X * decay_states)^T
                    # copy, C @ entering^T  [b, c, g, i, Q, p]
                    + 8 * hh * Q * pad  # decay = exp(segsum) and CB * decay  [b, c, g, i, Q, Q]
                    + 8 * hh * n * pad  # B and C broadcast to every head for the matmuls  [b, c, g, i, Q, n]
                    + 8 * G * pad + 4 * gl * Q * pad  # C and B^T copies, CB  [b, c, g, Q, Q]
                    + 4 * (2 * c + 1) * st  # copies of the c + 1 carried states and the c entering ones
                    + 16 * hh * pad + 4 * hh * (c + 1) ** 2 / seq)  # dt, softplus, decays per head; decay_chunk
            # the layer's peak is the gate y * silu(z): alive but not saved are the in_proj and SiLU outputs
            # (only copies are saved), B and C padded, Y, the gate's product, the carried and initial
            # states, the fp64 cumsum (the group norm's tensors do not exist yet)
            live = zx + xbc + 8 * G * pad + 4 * P * pad + 4 * P + 4 * (c + 2) * st + 8 * hh * pad - early
            # no autograd, at `y + x * D`: the locals x, X, Y, y's copy, x * D, the sum; decay, CB, B, C,
            # the carried and initial states; cumsums (one fp64) and decays per head
            nograd = (x_in + zx + xbc + 4 * P * (3 + 3 * pad) + 4 * hh * Q * pad + 4 * gl * Q * pad
                      + 8 * G * pad + 4 * (c + 2) * st + 24 * hh * pad)
            # the backward's gate (3 fp32 [b, l, h, p]) runs after the norm's saved tensors are freed
            scan_bwd = 3 * 4 * P - post
        return LayerBytes(norm + conv + scan + post, live, nograd, max(norm_bwd, scan_bwd) + resid)
    if kind == "*":
        nh = m.num_attention_heads // tp
        q, kv = nh * m.kv_channels, m.num_query_groups // tp * m.kv_channels
        # q's [b, heads, s, d] copy, K and V repeated to every query head, the SDPA output; fp32 log-sum-exp
        saved = norm + 4 * bw * q + 4 * nh
        live = bw * (q + 2 * kv)  # the QKV projection's output, which q / k / v are copied from
        # backward: linear_proj's input gradient, SDPA's dq, dk, dv at every query head (on a GPU also
        # flash attention's fp32 dq accumulator)
        grads = 4 * bw * q + (4 * q if fused else 0) + resid
        return LayerBytes(saved, live, x_in + live + 4 * bw * q + 4 * nh, grads)
    f = m.ffn_hidden_size // tp
    # squared_relu: ReLU's output (pow's input) and its square (fc2's input); fc1's output is live only;
    # backward: fc2's input gradient, pow's self^1, x 2 and the product
    return LayerBytes(norm + 2 * bw * f, bw * f, x_in + 3 * bw * f, 4 * bw * f + resid)


@dataclass
class Phase:
    """One thing to fit: parent training or one curriculum stage."""

    name: str
    seq: int
    micro_batch: int
    global_batch: int
    elastic: bool
    soft: bool = False  # the router learns in soft mode: budgets run at full width under soft masks
    recompute: str = ""  # the stage's own train.recompute ("" = the run's)


def soft_stage(cfg: RunConfig, stage) -> bool:
    """Whether a curriculum stage runs its router-chosen budgets under soft masks (train/elastic_loop.py)."""
    return stage.router == "learn" and cfg.elastic.mode == "soft"


def phases(cfg: RunConfig) -> list[Phase]:
    t = cfg.train
    out = [Phase("parent train", cfg.data.seq_length, t.micro_batch_size, t.global_batch_size, False)]
    for st in cfg.curriculum:
        out.append(Phase(f"elastic {st.name}", st.seq_length or cfg.data.seq_length,
                         st.micro_batch_size or t.micro_batch_size, st.global_batch_size or t.global_batch_size, True,
                         soft_stage(cfg, st), st.recompute))
    return out


def rank_memory(cfg: RunConfig, vocab: int, tp: int, pp: int, dp: int, ph: Phase, recompute: str,
                distributed_optimizer: bool, bw: int, kernels: str = "fused",
                sequence_parallel: bool = False) -> dict[str, float]:
    """Bytes per rank, by term, on the pipeline stage that needs the most. kernels: "fused" (GPU) or
    "torch" (the CPU fallbacks), see the module docstring. sequence_parallel: the residual stream,
    norms, layer outputs and p2p tensors hold 1/TP of the sequence per rank (with TP > 1)."""
    m = cfg.model
    sp = tp if sequence_parallel and tp > 1 else 1
    x_bytes = bw * m.hidden_size / sp  # one [s, b, h] residual-stream tensor per token, this rank's part
    pattern = m.hybrid_override_pattern
    sizes = stage_sizes(len(pattern), pp, None, None)  # even stages (uneven splits: see the config's own)
    tokens = ph.seq * ph.micro_batch
    n_micro = max(1, ph.global_batch // (ph.micro_batch * dp))
    full, vl = recompute == "full", vocab / tp
    worst: dict[str, float] = {}
    start = 0
    for stage, size in enumerate(sizes):
        kinds = pattern[start:start + size]
        start += size
        last = stage == pp - 1
        params = sum(split / tp + repl for split, repl in (layer_params(cfg, k) for k in kinds))
        if stage == 0:
            params += vocab * m.hidden_size / tp
        if last:
            params += vocab * m.hidden_size / tp + m.hidden_size
        layers = [layer_bytes(cfg, k, tp, bw, ph.seq, kernels, ph.soft, sp) for k in kinds]
        held = [x_bytes if full else lb.saved for lb in layers]  # per layer at the turn
        tail = norm_bytes(m.hidden_size, bw, kernels == "fused", ph.soft, sp) if last else 0.0  # the final norm
        embed = x_bytes if ph.soft and stage == 0 else 0.0  # saved by the hidden mask's product
        in_flight = min(pp - stage, n_micro)
        # last stage, at the turn: KD's log_ps, log_pt and CE's softmax, fp32 (elastic); CE's softmax (parent).
        # The loss's peak beyond them (_VocabParallelKL.forward): both bf16 logits, their fp32 copies, both
        # log-softmaxes, their difference, exp and product (KD's backward needs less); parent: the bf16
        # logits and CE's fp32 copy (megatron turns it into the softmax in place)
        logits = (12 if ph.elastic else 4) * vl * last
        loss = ((2 * bw + 28 if ph.elastic else bw + 4) * vl - logits) * last
        # Transients, per token; the loss's tensors (and the final norm's) do not exist yet in the layers'
        # forward and are freed before their backward; the later layers hold nothing yet / any more.
        gone = logits + tail
        cands = [loss, 0.0]
        for j, lb in enumerate(layers):
            later, rebuilt = sum(held[j + 1:]), lb.saved if full else 0.0
            # its forward, its backward (where a rebuild also has the residual stream's gradient)
            cands.append(rebuilt + max(lb.live + (x_bytes if full else 0), lb.grads) - later - gone)
        if ph.elastic:  # the teacher runs after the student's forward (its logits alive), before the loss,
            # one layer at a time: its residual stream and one layer's forward
            cands.append(x_bytes + max(lb.nograd for lb in layers) - logits + (bw * vl if last else 0))
        # send and receive buffers, each [s, b, h] (elastic: student and teacher side by side), x2 in flight
        p2p = 2 * tokens * x_bytes * (2 if ph.elastic else 1) * 2 if pp > 1 else 0.0
        opt_per_param = 12 if bw == 2 else 8
        terms = {
            "weights": params * bw,
            "main_grads": params * 4,
            "optimizer": params * opt_per_param / (dp if distributed_optimizer else 1),
            "teacher": params * bw if ph.elastic else 0.0,
            "activations": (sum(held) + tail + embed) * tokens * in_flight,
            "logits": logits * tokens,
            "backward": max(cands) * tokens,
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
        if cfg.parallel.sequence_parallel:  # every phase's sequence splits over the TP ranks
            ok = ok and all(ph.seq % tp == 0 for ph in phases(cfg))
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
            recompute = ph.recompute or cfg.train.recompute
            for dist_opt in (False, True):
                terms = rank_memory(cfg, vocab, tp, pp, dp, ph, recompute, dist_opt, bw,
                                    sequence_parallel=cfg.parallel.sequence_parallel)
                stage = terms.pop("stage")
                total = sum(terms.values()) + overhead
                routing = ("soft" if ph.soft else "hard") if ph.elastic else "-"
                rows.append({"tp": tp, "pp": pp, "dp": dp, "phase": ph.name, "seq": ph.seq, "routing": routing,
                             "distributed_optimizer": dist_opt, "recompute": recompute,
                             "run_recompute": cfg.train.recompute, "stage": stage,
                             **{k: v / GiB for k, v in terms.items()}, "runtime": overhead / GiB,
                             "total": total / GiB, "fits": total <= gpu_memory})
    return rows


def format_plan(rows: list[dict], gpu_memory: int, sequence_parallel: bool = False) -> str:
    cols = [*TERMS, "runtime", "total"]
    head = f"{'TP':>3} {'PP':>3} {'DP':>4} {'phase':<16} {'seq':>6} {'dist-opt':>8} {'recomp':>6} {'routing':>7} " + \
        " ".join(f"{c:>11}" for c in cols) + "  fits"
    lines = [f"per-rank memory in GiB (GPU memory {gpu_memory / GiB:.0f} GiB; worst pipeline stage; sequence "
             f"parallel {'on' if sequence_parallel else 'off'}; routing: how the elastic budgets run, soft = full "
             "width under the learning router's masks)", head]
    for r in rows:
        lines.append(f"{r['tp']:>3} {r['pp']:>3} {r['dp']:>4} {r['phase']:<16} {r['seq']:>6} "
                     f"{'yes' if r['distributed_optimizer'] else 'no':>8} {r['recompute']:>6} {r['routing']:>7} "
                     + " ".join(f"{r[c]:>11.1f}" for c in cols) + ("  yes" if r["fits"] else "  NO"))
    return "\n".join(lines)


def plan_both_recompute(cfg: RunConfig, vocab: int, gpu_memory: int, nodes: int, gpus_per_node: int,
                        overhead: int) -> list[dict]:
    """The plan with train.recompute none and full (a curriculum stage with its own `recompute` keeps
    it in both: `run_recompute` tells the two plans apart)."""
    rows = []
    for mode in ("none", "full"):
        rows += plan(replace(cfg, train=replace(cfg.train, recompute=mode)), vocab, gpu_memory, nodes, gpus_per_node,
                     overhead)
    return rows
