"""`elastic-megatron generate`: one checkpoint for every budget.

    elastic-megatron generate --checkpoint runs/elastic --budget 6B --prompt "q: 2+3 =" [--max-new 64]
    elastic-megatron generate --checkpoint exported/budget_6B --prompt "..."      (a Hugging Face directory)

On an elastic (or sorted) checkpoint the budget is cut at load time: the router the checkpoint
holds picks the subnet, and the parent's tensors are cut one at a time, each parent tensor freed
as soon as its cut exists, so memory stays near one parent (plus the router) and nothing is
written per budget. On a Hugging Face directory it runs transformers' own `generate` (greedy).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .config import RunConfig


def is_hf_dir(path: str) -> bool:
    return (Path(path) / "config.json").exists()


def cut_budget(cfg: RunConfig, budget: str, router_path: str = ""):
    """(sliced model, its config, tokenizer, real vocab, subnet) for `budget` of the parent in checkpoint.load."""
    from .elastic.jobs import _parent, choose_family
    from .elastic.slicing import slice_tensor, sliced_model_config, stage_parameters
    from .elastic.subnet import Subnet
    from .formats.hf_jobs import hf_vocab
    from .model.hybrid import build_model
    from .parallel import ParallelLayout

    single = replace(cfg, parallel=replace(cfg.parallel, tensor=1, pipeline=1, data=1))
    layout, tok, vocab, parent, loop = _parent(single, 1)
    (subnet, _), = choose_family(cfg, loop, vocab, [budget], router_path).values()
    if subnet == Subnet.full(single.model):
        return parent.eval(), single, tok, hf_vocab(cfg, tok.vocab_size), subnet
    cut, dtype = {}, next(parent.parameters()).dtype
    with torch.no_grad():
        for _, gname, p in stage_parameters(parent, single, layout):
            piece = slice_tensor(gname, p.detach(), single.model, subnet, 1)  # laid out for TP=1 when loaded
            if piece is not None:
                cut[piece[0]] = piece[1]  # its own storage (index_select), or a view that keeps it
            p.data = torch.empty(0, dtype=p.dtype)  # the parent's tensor is no longer needed
    del parent
    small_cfg = replace(single, model=sliced_model_config(single.model, subnet))
    # uninitialised storage is not resident until written, and each cut tensor is dropped once copied
    small = build_model(small_cfg, ParallelLayout.resolve(small_cfg, 1), vocab, dtype, initialize=False)
    with torch.no_grad():
        for _, gname, p in stage_parameters(small, small_cfg, layout):
            p.copy_(cut.pop(gname))
    return small.eval(), small_cfg, tok, hf_vocab(cfg, tok.vocab_size), subnet


def generate_elastic(cfg: RunConfig, budget: str, prompts: list[str], max_new: int, router_path: str = "",
                     ids: bool = False) -> list:
    """Greedy continuations (texts, or the generated ids with `ids`) from one budget of checkpoint.load."""
    from .inference import greedy_ids
    from .parallel import destroy_distributed

    try:
        small, small_cfg, tok, n_vocab, _ = cut_budget(cfg, budget, router_path)
        out = greedy_ids(small, tok, prompts, max_new, small_cfg.model.hybrid_override_pattern,
                         small_cfg.model.norm_epsilon, vocab_limit=n_vocab)
        return out if ids else [tok.decode(g) for g in out]
    finally:
        destroy_distributed()


@torch.no_grad()
def generate_hf(path: str, prompts: list[str], max_new: int, ids: bool = False) -> list:
    """Greedy continuations from a Hugging Face directory (stock or elastic-megatron's modelling code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # heterogeneous exports name their modelling code in config.json, which AutoTokenizer reads too
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        prompt_ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(prompt_ids, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        new = gen[0, prompt_ids.shape[1]:].tolist()
        if ids:
            out.append(new)
            continue
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        out.append(tok.decode(new, skip_special_tokens=True))
    return out
