"""Scoring the router's deploy proposals: the router proposes, validation disposes (issue 23).

At the start of the first `router: frozen` stage, `elastic/deploy.deployed_family` asks for a score
per proposed subnet and deploys the best one. This module builds that score, on any layout:

    metric = exact   held-out problems of the stage's data (the synthetic corpus' valid split, one
                     problem per row: <bos> prompt solution <eos>, padded), teacher-forced: a problem
                     counts when the student's argmax is the right token at every position of its
                     solution and <eos>, which is exactly "greedy decoding writes the reference
                     solution". Score (problems missed, mean solution-token loss): fewest misses
                     first, the loss breaks ties.
    metric = solution  the same held-out problems, scored by their mean solution-token loss first
                     (rounded to 1e-3: two layouts' summation orders differ by ~1e-7, which
                     changes a rounded value only at a rounding boundary), then problems missed.
    metric = loss    the mean next-token loss on validation sequences of the stage's data (any
                     data source; packed sequences, prompts included).

Why exact is the default for the synthetic corpus: measured in the demo's seed study
(docs/results.md), two 0.5 subnets of one run with the same held-out loss (0.287) scored 0.328 and
0.273 short accuracy. A packed sequence's loss is mostly its prompts' random digits, which no
subnet predicts better than another; the deployed model is judged on its solutions.

Every rank computes the same score: the problems are split over the DP ranks, each stage of a
pipeline runs megatron's schedule forward-only (so pipeline parallelism can score too), and the
last stage's sums are all-reduced over the pipeline and data-parallel groups. Counts are integers,
so the choice does not depend on the layout; the loss only breaks ties.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from ..config import RunConfig
from ..data.build import build_datasets
from ..elastic.subnet import subnet_params
from ..model.hybrid import model_device
from .loop import run_schedule


def problem_rows(cfg: RunConfig, tok, n: int, seq: int) -> dict[str, torch.Tensor]:
    """n held-out (valid split) problems of cfg.data's step range, one per row of seq tokens:
    tokens / labels / position_ids [n, seq], `solution` [n, seq], 1.0 where the label is a token
    of the problem's solution or its <eos> (what greedy decoding must write), 0.0 on the prompt and
    the padding, and `length` [n], the tokens each row uses. A problem longer than the row is cut
    (`cut` [n]); its missing tail counts as wrong."""
    from ..data.synthetic import derive_seed, generate_problems

    d = cfg.data
    problems = generate_problems(n, seed=derive_seed("deploy", cfg.train.seed), min_steps=d.min_steps,
                                 max_steps=d.max_steps, split="valid")
    tokens = torch.full((n, seq + 1), tok.pad_id, dtype=torch.long)
    solution = torch.zeros(n, seq)
    cut = torch.zeros(n, dtype=torch.bool)
    length = torch.zeros(n, dtype=torch.long)
    for i, p in enumerate(problems):
        prompt = [tok.bos_id] + tok.encode(p.prompt)
        ids = prompt + tok.encode(p.solution) + [tok.eos_id]
        cut[i] = len(ids) > seq + 1
        ids = ids[:seq + 1]
        tokens[i, :len(ids)] = torch.tensor(ids)
        solution[i, len(prompt) - 1:len(ids) - 1] = 1.0  # label j is token j + 1
        length[i] = len(ids) - 1
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "position_ids": torch.arange(seq).expand(n, seq).contiguous(), "solution": solution, "cut": cut,
            "length": length}


def _token_right(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, s, V/tp] vocab-parallel logits, [b, s] labels -> [b, s] bool: is the label the argmax
    (a tie counts as right). Max and the label's logit are all-reduced over TP: exact operations."""
    lg = logits.float()
    top = lg.max(dim=-1).values
    vp = lg.shape[-1]
    local = labels - ps.get_tensor_model_parallel_rank() * vp
    inside = (local >= 0) & (local < vp)
    mine = lg.gather(-1, local.clamp(0, vp - 1)[..., None])[..., 0]
    lab = torch.where(inside, mine, torch.zeros_like(mine))
    if ps.get_tensor_model_parallel_world_size() > 1:
        group = ps.get_tensor_model_parallel_group()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lab, group=group)  # only the rank holding the label adds a non-zero
    return lab >= top


def _token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, s, V/tp] vocab-parallel logits, [b, s] labels -> [b, s] next-token loss (fp32)."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                        labels.transpose(0, 1).contiguous()).transpose(0, 1)


def _exact_stats(batch, logits):
    """[b, s, V/tp] -> sums over this micro-batch: problems, problems right, solution-token loss, tokens."""
    sol = batch["solution"]
    ce = _token_ce(logits, batch["labels"])
    wrong = ((~_token_right(logits, batch["labels"])) & (sol > 0)).any(dim=1) | batch["cut"]
    real = sol.sum(dim=1) > 0  # rows that hold a problem (the rest only pad a micro-batch)
    stats = torch.stack([real.sum(), (real & ~wrong).sum(), (ce * sol).sum(), sol.sum()]).double()
    return stats[1].clone(), {"stats": stats}


def _loss_stats(batch, logits):
    mask = batch["loss_mask"].float()
    ce = _token_ce(logits, batch["labels"])
    zero = mask.sum() * 0
    stats = torch.stack([zero, zero, (ce * mask).sum(), mask.sum()]).double()
    return stats[2].clone(), {"stats": stats}


def _score_step(s_view, subnet, stats_fn, data_iterator, model):
    batch = next(data_iterator)
    hidden_in = None if s_view.model.pre_process else s_view.model.decoder.input_tensor
    logits = s_view(batch["tokens"], batch["position_ids"], None, subnet=subnet, hidden_in=hidden_in)
    if not s_view.model.post_process:
        return logits, None
    return logits, partial(stats_fn, batch)


def deploy_metric(cfg: RunConfig) -> str:
    """elastic.deploy_metric with auto resolved: exact on the synthetic corpus, else loss."""
    m = cfg.elastic.deploy_metric
    return m if m != "auto" else ("exact" if cfg.data.source == "synthetic" else "loss")


def score_tuple(metric: str, problems: float, right: float, loss: float) -> tuple:
    """The comparable score of one proposal (lower is better) from its all-reduced sums."""
    missed = round(problems - right)
    if metric == "exact":
        return (missed, loss)
    if metric == "solution":
        # rounded: another layout's summation order (~1e-7 apart) moves it only at a rounding boundary
        return (round(loss, 3), missed, loss)
    return (0, loss)


def deploy_scorer(s_view, model, cfg: RunConfig, stage_cfg: RunConfig, tok, mbs: int, vocab: int):
    """subnet -> score (lower is better; a tuple, compared in order) for `deployed_family`, the same
    on every rank. `model`: what megatron's schedule gets (the DDP-wrapped student); `stage_cfg`:
    the first frozen stage's config (its data range and sequence length); `mbs`: its micro-batch
    size; `vocab`: the padded vocabulary (for the logged parameter counts)."""
    e, seq, metric = cfg.elastic, stage_cfg.data.seq_length, deploy_metric(cfg)
    n = e.deploy_calibration_samples or (16 if metric == "loss" else 64)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    step = 8 * ps.get_tensor_model_parallel_world_size()  # row lengths: multiples of this (sequence parallel)
    if metric in ("exact", "solution"):
        rows = problem_rows(stage_cfg, tok, n, seq)
        # longest first, dealt out to the DP ranks in turn: each micro-batch holds problems of
        # similar length, and every rank a similar share of the work
        order = torch.argsort(-rows["length"], stable=True)
        rows = {k: v[order] for k, v in rows.items()}
        length = rows.pop("length")
    else:
        _, valid = build_datasets(stage_cfg, tok, num_train=1, num_valid=n)
        samples = [valid[i] for i in range(n)]
        rows = {k: torch.stack([x[k] for x in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        length = torch.full((n,), seq)
    # this DP rank's share, padded with empty rows (no solution, no loss) to whole micro-batches
    idx = torch.arange(rank, n, dp)
    per = -(-n // dp)  # rows on the busiest rank
    n_micro = max(1, -(-per // mbs))  # the same on every rank
    pad = n_micro * mbs - len(idx)
    device = model_device(s_view.model)
    mine = {}
    for k, v in rows.items():
        part = v[idx]
        filler = torch.zeros((pad, *v.shape[1:]), dtype=v.dtype) if k != "position_ids" else v[:1].expand(pad, -1)
        mine[k] = torch.cat([part, filler]).to(device)
    lens = torch.cat([length[idx], torch.ones(pad, dtype=length.dtype)])
    # causal model: positions after a row's solution change nothing before them, so a micro-batch is
    # cut to its longest problem (the demo's 2-6-step problems: ~half the tokens of 256-token rows);
    # a pipeline's stages exchange fixed shapes, so there every micro-batch is cut to the longest
    cut = lambda m: min(seq, -(-m // step) * step)  # noqa: E731
    pp = ps.get_pipeline_model_parallel_world_size() > 1
    longest = int(lens.max())
    micro = []
    for i in range(n_micro):
        width = cut(longest if pp else int(lens[i * mbs:(i + 1) * mbs].max()))
        micro.append({k: v[i * mbs:(i + 1) * mbs, :width] if v.dim() == 2 else v[i * mbs:(i + 1) * mbs]
                      for k, v in mine.items()})
    seq = cut(longest)
    stats_fn = _loss_stats if metric == "loss" else _exact_stats

    def score(subnet):
        with torch.no_grad():
            outs = run_schedule(model, partial(_score_step, s_view, subnet, stats_fn), iter(micro), n_micro, cfg, seq,
                                forward_only=True, micro_batch_size=mbs)
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage():
            sums += torch.stack([o["stats"] for o in outs]).sum(0).to(device)
        dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())  # last stage -> every stage
        dist.all_reduce(sums, group=ps.get_data_parallel_group())  # every DP rank's problems
        problems, right, ce, tokens = sums.tolist()
        loss = ce / max(tokens, 1.0)
        result = score_tuple(metric, problems, right, loss)
        if dist.get_rank() == 0:  # the evidence for the choice: every proposal and its score
            dropped = [i for i, k in enumerate(subnet.keep) if not k]
            what = (f"exact {right:.0f}/{problems:.0f}, solution loss {loss:.4f}" if metric != "loss"
                    else f"calibration loss {loss:.4f}")
            print(f"[deploy] proposal {subnet_params(subnet, cfg.model, vocab):,} params, dropped layers {dropped},"
                  f" hidden {subnet.hidden}, mamba heads {list(subnet.mamba_heads)}, head dim {list(subnet.mamba_head_dim)}, attn heads"
                  f" {list(subnet.attn_heads)}, ffn {list(subnet.ffn)}: {what}", flush=True)
        return result
    return score
