"""One set of weights, every budget: cached decoding of a budget's subnet on views of the parent.

    engine = Engine.load(cfg, ["1.0", "0.5"])          # the sorted / elastic parent, loaded once
    out = engine.generate(Request("elastic-1.2M", prompt_ids, max_tokens=64))

Every budget is a prefix of each sorted dimension (elastic/sorting.py), so its weight matrices are
views of the parent's (a prefix of rows and columns; a layer the budget drops is skipped). At load
the Mamba layers' d_inner channels are reordered in place (`pack_mamba_channels`) so that a budget
that cuts the head dim is one prefix too instead of one run per head, and every view a decode step
multiplies is cut once (`budget_views`), so a step runs no slicing ops. Only the per-channel vectors
of a Mamba layer (conv taps and bias, A, D, dt_bias, the gated norm; a few KB per layer) are
gathered once per budget. Memory is therefore one parent plus those vectors, whatever the number
of budgets (benchmarks/serve_bench.py measures it, and decode speed against the exported subnet).

The step math is inference.CachedDecoder's (the recurrent form of the chunked scan) on the subnet's
runs, so greedy decoding equals `generate --budget` token for token (tests/unit/test_serve.py):

    Mamba:     conv state [b, c_k, w], SSM state [b, H_k, d_k, N]   (kept heads / head dims)
    attention: K, V cache [b, G, t, d]                              (a_k query heads per group)
    MLP:       fc1 rows[:f_k] -> squared ReLU -> fc2 cols[:f_k];  hidden: x[..., :h_k]

Requests are batched per budget: the worker thread takes every queued request, groups them by
budget and decodes each group as one batch (rows of different lengths need no padding: each row
feeds its own prompt until it runs out). Each request owns its rows' state, so concurrent clients
never share a cache. This is static batching: a request that arrives mid-batch waits for the next.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..elastic.linear import kept_rows, sliced_linear
from ..elastic.model import _attn_runs, _mamba_rows, rms_norm
from ..inference import attention_step, mamba_step
from ..elastic.subnet import Subnet, layer_slots, subnet_params
from ..model.hybrid import squared_relu
from ..model.weights import pre_norm_weight


def model_id(params: int) -> str:
    """elastic-12B, elastic-9B, elastic-2.4M: the budget's size, as users name models."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if params >= scale:
            v = params / scale
            return f"elastic-{v:.0f}{unit}" if v >= 10 else f"elastic-{v:.2g}{unit}"
    return f"elastic-{params}"


@dataclass
class Budget:
    """One served budget: its subnet, what it is called, its gathered per-channel vectors and the
    weight views one decode step multiplies."""

    id: str
    aliases: list[str]
    subnet: Subnet
    params: int
    small: dict  # layer index -> the Mamba layer's gathered vectors (the only non-view tensors)
    views: dict  # budget_views(): slices of the parent's tensors, made once


class BudgetDecoder:
    """Step-by-step forward of one budget's subnet on the parent's weights, one state per row.
    Every weight it multiplies was cut once at load (budget_views): a decode step of a small model is
    bound by the number of ops, and slicing the weights anew in every layer of every step cost
    more than the gathers (measured: 343 ops per step against the exported model's 299)."""

    def __init__(self, parent, cfg, budget: Budget):
        self.m, self.b = cfg.model, budget  # the parent's weights come as the budget's views
        self.slots = layer_slots(cfg.model.hybrid_override_pattern)
        self.state: list = [None] * len(self.slots)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b] -> logits [b, V] of the budget's subnet."""
        w, eps = self.b.views, self.m.norm_epsilon
        x = F.embedding(tokens, w["embedding"])  # [b, h_k]
        for i, v in enumerate(w["layers"]):
            if v is None:
                continue  # a dropped layer is the identity
            kind, k = self.slots[i]
            h = rms_norm(x, v["norm"], eps)
            x = x + (self._mamba(i, k, v, h) if kind == "M" else self._attention(i, k, v, h) if kind == "*"
                     else F.linear(squared_relu(F.linear(h, v["fc1"])), v["fc2"]))
        return F.linear(rms_norm(x, w["final_norm"], eps), w["output"])  # [b, V]

    def _mamba(self, i: int, k: int, w: dict, h):
        m, s, v = self.m, self.b.subnet, self.b.small[i]
        G, N = m.mamba_num_groups, m.mamba_state_dim
        Hk, b = s.mamba_heads[k], h.shape[0]
        d_in = Hk * s.mamba_head_dim[k]
        # packed in_proj (pack_mamba_channels): this budget's rows are a prefix, one GEMM on a view;
        # one gather puts them back in the head-major [z | x B C | dt] layout the SSM needs
        zxbcdt = F.linear(h, w["in_proj"]).index_select(-1, v["row_idx"])
        z, xbc, dt = torch.split(zxbcdt, [d_in, d_in + 2 * G * N, Hk], dim=-1)
        if self.state[i] is None:
            self.state[i] = (h.new_zeros(b, xbc.shape[-1], v["conv_w"].shape[-1]),
                             h.new_zeros(b, Hk, s.mamba_head_dim[k], N, dtype=torch.float32))
        y = mamba_step(self.state[i], xbc, z, dt, v["conv_w"], v["conv_b"], v["A"], v["D"], v["dt_bias"],
                       v["norm_w"], G)  # [b, d_in], head-major
        return F.linear(y.index_select(1, v["c_perm"]), w["out_proj"])  # packed column order, as out_proj's

    def _attention(self, i: int, k: int, w: dict, h):
        G, d = self.m.num_query_groups, self.m.kv_channels
        a = self.b.subnet.attn_heads[k] // G
        b = h.shape[0]
        qkv = F.linear(h, w["qkv"]) if w["qkv_runs"] is None else sliced_linear(h, w["qkv"], rows=w["qkv_runs"])
        qkv = qkv.view(b, G, a + 2, d)  # per group: [q_0 .. q_a-1, k, v]
        ctx, self.state[i] = attention_step(self.state[i], qkv[:, :, :a], qkv[:, :, a:a + 1], qkv[:, :, a + 1:])
        return F.linear(ctx, w["proj"]) if w["proj_runs"] is None else sliced_linear(ctx, w["proj"],
                                                                                     cols=w["proj_runs"])


def budget_views(parent, cfg, s: Subnet, small: dict) -> dict:
    """The weights one decode step of subnet `s` multiplies, as slices of the parent's tensors (no
    copy: tests/unit/test_serve.py checks the storage). Prefixes are plain views; an attention layer
    whose query heads are cut keeps one run of rows per group, multiplied run by run (sliced_linear)."""
    m, h = cfg.model, s.hidden
    layers = []
    for i, (layer, (kind, k)) in enumerate(zip(parent.decoder.layers, layer_slots(m.hybrid_override_pattern))):
        if not s.keep[i]:
            layers.append(None)
            continue
        v = {"norm": pre_norm_weight(layer, kind)[:h]}
        if kind == "M":
            mx = layer.mixer
            d_in = s.mamba_heads[k] * s.mamba_head_dim[k]
            v.update(in_proj=mx.in_proj.weight[:small[i]["n_rows"], :h], out_proj=mx.out_proj.weight[:h, :d_in])
        elif kind == "*":
            att, G = layer.self_attention, m.num_query_groups
            qkv_runs, proj_cols = _attn_runs(G, m.num_attention_heads // G, m.kv_channels, s.attn_heads[k] // G)
            one = len(qkv_runs) == 1  # every head kept: one prefix of rows / columns
            v.update(qkv=att.linear_qkv.weight[:, :h], qkv_runs=None if one else qkv_runs,
                     proj=att.linear_proj.weight[:h, :proj_cols[0][1]] if one else att.linear_proj.weight[:h],
                     proj_runs=None if one else proj_cols)
        else:
            f = s.ffn[k]
            v.update(fc1=layer.mlp.linear_fc1.weight[:f, :h], fc2=layer.mlp.linear_fc2.weight[:h, :f])
        layers.append(v)
    return {"embedding": parent.embedding.word_embeddings.weight[:, :h], "layers": layers,
            "final_norm": parent.decoder.final_norm.weight[:h], "output": parent.output_layer.weight[:, :h]}


@torch.no_grad()
def pack_mamba_channels(parent, cfg, subnets: list[Subnet]) -> list:
    """Reorder, in place, each Mamba layer's d_inner channels in in_proj (z and x rows, and the dt
    rows of the heads) and out_proj (columns) so that every served budget's kept channels are a
    prefix: channels kept by more budgets first. Why: sorted by importance, a budget that cuts the
    head dim keeps one run of rows per head (28 runs at the demo's 50 %), one GEMM each at decode;
    packed, it is one row prefix of in_proj and one column prefix of out_proj. The SSM needs its
    rows head-major, so the decoder gathers its few activations back (BudgetDecoder).
    Nothing else moves: conv, norm, A, D, dt_bias are read at original indices (gather_small).
    Returns per layer (packed position of each original in_proj row, of each out_proj column)."""
    m, out = cfg.model, []
    H, p = m.mamba_num_heads, m.mamba_head_dim
    hpg, G = H // m.mamba_num_groups, m.mamba_num_groups
    for layer, (kind, k) in zip(parent.decoder.layers, layer_slots(m.hybrid_override_pattern)):
        if kind != "M":
            out.append(None)
            continue
        head_level, chan_level = torch.zeros(H), torch.zeros(H, p)
        for s in subnets:
            if s.keep[len(out)]:
                a, d = s.mamba_heads[k] // G, s.mamba_head_dim[k]
                kept = (torch.arange(H) % hpg) < a  # a heads of every group
                head_level += kept
                chan_level += kept[:, None] & (torch.arange(p) < d)[None, :]
        # stable sorts: ties keep the importance order within a level. in_proj rows: z and x rows at
        # their channel's level, dt rows at their head's, B/C rows (kept by every budget) first.
        bc = 2 * m.mamba_num_groups * m.mamba_state_dim
        row_level = torch.cat([chan_level.reshape(-1), chan_level.reshape(-1), torch.full((bc,), len(subnets) + 1.0),
                               head_level])
        r_order = torch.sort(-row_level, stable=True).indices  # original in_proj row at each packed row
        c_order = torch.sort(-chan_level.reshape(-1), stable=True).indices  # out_proj columns likewise
        w, wo = layer.mixer.in_proj.weight, layer.mixer.out_proj.weight
        w.copy_(w.index_select(0, r_order.to(w.device)))
        wo.copy_(wo.index_select(1, c_order.to(wo.device)))
        out.append((torch.argsort(r_order).to(w.device), torch.argsort(c_order).to(w.device)))
    return out


def gather_small(parent, cfg, s: Subnet, packed: list) -> dict:
    """Per Mamba layer the budget keeps: its per-channel vectors at the kept channels (made once)."""
    m, out = cfg.model, {}
    for i, (layer, (kind, k)) in enumerate(zip(parent.decoder.layers, layer_slots(m.hybrid_override_pattern))):
        if kind != "M" or not s.keep[i]:
            continue
        mx, G = layer.mixer, m.mamba_num_groups
        rows, conv_idx, heads, chans = _mamba_rows(m.mamba_num_heads, G, m.mamba_head_dim, m.mamba_state_dim,
                                                s.mamba_heads[k] // G, s.mamba_head_dim[k], mx.in_proj.weight.device)
        with torch.no_grad():
            out[i] = {"conv_w": kept_rows(mx.conv1d.weight, conv_idx).squeeze(1).contiguous(),
                      "conv_b": kept_rows(mx.conv1d.bias, conv_idx).contiguous(),
                      "A": -torch.exp(kept_rows(mx.A_log, heads).float()), "D": kept_rows(mx.D, heads).float(),
                      "dt_bias": kept_rows(mx.dt_bias, heads).float(), "norm_w": kept_rows(mx.norm.weight, chans),
                      # where this budget's head-major rows / channels sit in the packed prefix
                      "row_idx": packed[i][0][rows], "n_rows": rows.numel(),
                      # y (head-major) -> out_proj's packed column order: y[:, c_perm]
                      "c_perm": torch.argsort(packed[i][1][chans])}
    return out


# ----------------------------------------------------------------------------- requests


@dataclass
class Request:
    """One completion: prompt ids (after <bos>) of one budget, how to sample, when to stop."""

    model: str
    prompt_ids: list[int]
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    on_token: Optional[Callable[[str], None]] = None  # streaming: each new piece of text
    # filled in by the engine
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)
    _sent: int = 0  # characters of `text` already streamed


class Engine:
    """The parent held once, its budgets, and a worker thread that decodes queued requests per budget."""

    def __init__(self, parent, cfg, tok, vocab_limit: int, budgets: list[Budget], max_batch: int = 32):
        self.parent, self.cfg, self.tok, self.vocab_limit = parent, cfg, tok, vocab_limit
        self.budgets = budgets
        self.by_name = {n: b for b in budgets for n in (b.id, *b.aliases)}
        self.max_batch = max_batch
        self.max_len = cfg.model.max_sequence_length
        self.device = next(parent.parameters()).device
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="elastic-serve-worker", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, cfg, budget_names: list[str], router_path: str = "", max_batch: int = 32) -> "Engine":
        """The checkpoint in cfg.checkpoint.load at TP=PP=1, and every budget's subnet chosen as
        `slice` / `generate` choose it; the full model is always served too."""
        from dataclasses import replace

        from ..elastic.jobs import _parent, choose_family
        from ..formats.hf_jobs import hf_vocab

        single = replace(cfg, parallel=replace(cfg.parallel, tensor=1, pipeline=1, data=1))
        layout, tok, vocab, parent, loop = _parent(single, 1)
        parent.eval().requires_grad_(False)
        names = list(dict.fromkeys([*(budget_names or single.elastic.budgets), "1.0"]))
        family = choose_family(single, loop, vocab, names)
        packed = pack_mamba_channels(parent, single, list(dict.fromkeys(s for s, _ in family.values())))
        budgets: dict[Subnet, Budget] = {}
        for name, (subnet, _) in family.items():
            if subnet in budgets:  # two names for one subnet (e.g. "1.0" and the parent's size)
                budgets[subnet].aliases.append(name)
                continue
            params = subnet_params(subnet, single.model, vocab)
            small = gather_small(parent, single, subnet, packed)
            budgets[subnet] = Budget(model_id(params), [name], subnet, params, small,
                                     budget_views(parent, single, subnet, small))
        ordered = sorted(budgets.values(), key=lambda b: -b.params)
        return cls(parent, single, tok, hf_vocab(cfg, tok.vocab_size), ordered, max_batch)

    # -- the client side ---------------------------------------------------------

    def submit(self, req: Request) -> Request:
        if req.model not in self.by_name:
            raise KeyError(req.model)
        self._queue.put(req)
        return req

    def generate(self, req: Request, timeout: Optional[float] = None) -> Request:
        self.submit(req).done.wait(timeout)
        if req.error is not None:
            raise req.error
        return req

    # -- the worker --------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker (queued requests are answered first), so the parent can be freed."""
        self._queue.put(None)
        self._worker.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending = [first]
            while True:  # everything queued now joins this round
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # close(): answer what is here, then stop
                    self._queue.put(None)
                    break
                pending.append(nxt)
            groups: dict[str, list[Request]] = {}
            for r in pending:
                groups.setdefault(self.by_name[r.model].id, []).append(r)
            for bid, reqs in groups.items():
                for start in range(0, len(reqs), self.max_batch):
                    batch = reqs[start:start + self.max_batch]
                    try:
                        self._decode(self.by_name[bid], batch)
                    except BaseException as exc:  # the server stays up; each request says what happened
                        for r in batch:
                            r.error = exc
                    for r in batch:
                        r.done.set()

    @torch.no_grad()
    def _decode(self, budget: Budget, reqs: list[Request]) -> None:
        """Every row feeds its own prompt, then its own samples; a row stops at <eos>, a stop string
        or max_tokens. One decoder, so one state per row, shared by no other request."""
        dev, tok = self.device, self.tok
        prompts = [[tok.bos_id, *r.prompt_ids] for r in reqs]
        lens = [len(p) for p in prompts]
        gens = [torch.Generator(device="cpu").manual_seed(r.seed if r.seed is not None else
                                                           int(torch.randint(0, 2**62, ()).item())) for r in reqs]
        dec = BudgetDecoder(self.parent, self.cfg, budget)
        live = list(range(len(reqs)))
        cur = torch.tensor([p[0] for p in prompts], device=dev)
        t = 0
        while live:
            logits = dec.step(cur)[:, :self.vocab_limit].float()  # [b, V]
            greedy = logits.argmax(-1).tolist()  # one host sync per step for the whole batch
            t += 1
            nxt = []
            for r_i in range(len(reqs)):
                if t < lens[r_i]:  # still reading its prompt
                    nxt.append(prompts[r_i][t])
                    continue
                req = reqs[r_i]
                if req.finish_reason:
                    nxt.append(tok.pad_id)  # finished: its row runs on, unread (cheaper than re-batching)
                    continue
                token = greedy[r_i] if req.temperature <= 0 else _sample(logits[r_i], req.temperature, req.top_p,
                                                                         gens[r_i])
                self._append(req, token)
                nxt.append(token)
            live = [i for i in range(len(reqs)) if not reqs[i].finish_reason]
            cur = torch.tensor(nxt, device=dev)

    def _append(self, req: Request, token: int) -> None:
        """One sampled token into the request: its text, its stop strings, its stream. The stream holds
        back the last characters that could still begin a stop string, so it never sends text the
        finished answer does not have (streaming equals non-streaming)."""
        if token == self.tok.eos_id:
            req.finish_reason = "stop"
        else:
            req.ids.append(token)
            req.text = self.tok.decode(req.ids)
            for s in req.stop:
                at = req.text.find(s)
                if at >= 0:  # cut before the stop string, which is not returned (OpenAI's behaviour)
                    req.text, req.finish_reason = req.text[:at], "stop"
                    break
            if not req.finish_reason and len(req.ids) >= req.max_tokens:
                req.finish_reason = "length"
        if req.on_token is None:
            return
        hold = 0 if req.finish_reason else max((len(s) - 1 for s in req.stop), default=0)
        upto = max(req._sent, len(req.text) - hold)
        if upto > req._sent:
            req.on_token(req.text[req._sent:upto])
            req._sent = upto


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Nucleus sampling from the row's own generator (temperature 0 is the batch's argmax, _decode)."""
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
