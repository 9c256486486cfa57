"""torchrun worker for test_sorting_tp.py: importance + sorting under one parallel layout after another.

    torchrun --nproc_per_node=1 tests/distributed/_sort_worker.py OUT ref
        TP=1: saves OUT/ref.pt = scores, unsorted logits on random tokens, full weights sorted
    torchrun --nproc_per_node=2 tests/distributed/_sort_worker.py OUT tp2 pp2 dp2
        for each layout: importance vs the reference, logits before/after sorting (with the
        reference scores), the gathered full sorted weights vs the reference (its FFN dealt out
        to the TP shards, sorting.ffn_layout); OUT/results.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from elastic_megatron.config import load_config
from elastic_megatron.data.synthetic import SyntheticReasoningDataset
from elastic_megatron.elastic.importance import (
    ImportanceScores,
    _stage_offset,
    calibration_batches,
    estimate_importance,
    run_forward,
)
from elastic_megatron.elastic.sorting import ffn_relay_index, sort_parent
from elastic_megatron.model import sharding
from elastic_megatron.model.hybrid import build_model, global_name
from elastic_megatron.parallel import ParallelLayout, init_distributed

BASE = ["train.micro_batch_size=1", "train.global_batch_size=4", "data.seq_length=48", "elastic.importance_batches=2"]
LAYOUTS = {"ref": [], "tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"], "dp2": ["parallel.data=2"]}
VOCAB = 64


def tp_pieces(t: torch.Tensor) -> list[torch.Tensor]:
    """Every TP rank's copy of `t`, in rank order."""
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def logits_of(model, batch) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] on the last stage, None elsewhere."""
    out = {}
    run_forward(model, [batch], lambda i, lg: out.__setitem__(i, torch.cat(tp_pieces(lg), dim=-1)))
    return out.get(0)


def full_weights(model, cfg, layout) -> dict[str, torch.Tensor]:
    """This stage's parameters as full (TP=1) tensors under their global names."""
    offset, res = _stage_offset(cfg.model, layout), {}
    for name, p in model.named_parameters():
        gname = global_name(name, offset)
        res[gname] = sharding.unshard(gname, tp_pieces(p.detach()), cfg.model)
    return res


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def score_err(s: ImportanceScores, r: ImportanceScores) -> float:
    pairs = [(s.hidden, r.hidden)] + [(a, b) for f in ("ffn", "attn", "mamba_heads", "mamba_head_dim")
                                      for a, b in zip(getattr(s, f), getattr(r, f), strict=True)]
    pairs.append((torch.tensor(s.layer_scores), torch.tensor(r.layer_scores)))
    return max(rel(a, b) for a, b in pairs)


def run_layout(name: str, out_dir: str) -> dict | None:
    from megatron.core import parallel_state as ps

    cfg = load_config(None, [*BASE, *LAYOUTS[name]])
    layout = ParallelLayout.resolve(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(layout, cfg.train.seed)
    model = build_model(cfg, layout, VOCAB, torch.float32).eval()
    batches = calibration_batches(SyntheticReasoningDataset(48, 64, seed=3), cfg, layout)
    g = torch.Generator().manual_seed(0)
    probe = {"tokens": torch.randint(0, VOCAB, (2, 40), generator=g), "position_ids": torch.arange(40).expand(2, 40)}
    scores = estimate_importance(model, batches, cfg, layout)
    if name == "ref":
        unsorted = logits_of(model, probe)
        sort_parent(model, scores, cfg.model, layout)
        torch.save({"scores": {k: getattr(scores, k) for k in scores.__dataclass_fields__},
                    "logits": unsorted, "weights": full_weights(model, cfg, layout)},
                   os.path.join(out_dir, "ref.pt"))
        return None

    ref = torch.load(os.path.join(out_dir, "ref.pt"), weights_only=True)
    ref_scores = ImportanceScores(**ref["scores"])
    before = logits_of(model, probe)
    plan = sort_parent(model, ref_scores, cfg.model, layout)  # reference scores: weights compare exactly
    after = logits_of(model, probe)
    weights = full_weights(model, cfg, layout)
    n = cfg.model.ffn_hidden_size
    relay = ffn_relay_index(n, 1, layout.tensor)  # the TP=1 order dealt out to this layout's shards
    expected = {k: w.index_select(0, relay) if k.endswith("linear_fc1.weight") else
                w.index_select(1, relay) if k.endswith("linear_fc2.weight") else w for k, w in ref["weights"].items()}
    res = {
        "score_rel_err": score_err(scores, ref_scores),
        "order_equal": float(scores.layer_order == ref_scores.layer_order),
        "logits_vs_ref": rel(before, ref["logits"]) if before is not None else 0.0,
        "sorted_vs_unsorted": float((after - before).abs().max()) if before is not None else 0.0,
        "weights_max_diff": max(float((w - expected[k]).abs().max()) for k, w in weights.items()),
        "ffn_ranked_globally": float(all(torch.equal(p, sc.argsort(descending=True, stable=True))
                                         for p, sc in zip(plan.ffn, ref_scores.ffn))),
        "stage_params": float(len(weights)),
    }
    # the worst value over ranks (stage_params: summed, so both PP stages together must cover the model)
    worst = {}
    for key, value in res.items():
        flag = key in ("order_equal", "ffn_ranked_globally")
        op = dist.ReduceOp.SUM if key == "stage_params" else dist.ReduceOp.MIN if flag else dist.ReduceOp.MAX
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=op)
        worst[key] = float(t)
    worst["stage_params"] /= layout.tensor * layout.data
    worst["ref_params"] = float(len(ref["weights"]))
    return worst


def main() -> None:
    torch.set_num_threads(1)
    out_dir, names = sys.argv[1], sys.argv[2:]
    results = {name: run_layout(name, out_dir) for name in names}
    if names != ["ref"] and dist.get_rank() == 0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    from elastic_megatron.parallel import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
