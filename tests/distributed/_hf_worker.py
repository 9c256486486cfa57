"""torchrun worker: import-hf and export-hf at TP=N (every rank holds its shard only).

Usage: torchrun --nproc_per_node=N tests/distributed/_hf_worker.py HF_SRC RUN_DIR EXPORT_DIR OUT.json
Imports HF_SRC at TP=N, runs megatron's forward at TP=N on the reference tokens (logits gathered over
the vocab-parallel shards), exports the full model at TP=N; rank 0 writes the max logit difference.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from elastic_megatron.config import load_config
from elastic_megatron.formats.hf_jobs import export_hf_job, import_hf_job, resolve_export_config
from elastic_megatron.model.hybrid import build_model
from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed
from elastic_megatron.train.checkpoint import load_checkpoint, resolve_checkpoint

FAST = ["logging.wandb_mode=disabled", "logging.progress=false", "model.backend=local"]


def _check_pipeline(run: str, src: str) -> float:
    from elastic_megatron.elastic.slicing import stage_parameters
    from elastic_megatron.formats import hf
    from elastic_megatron.formats.safetensors_io import HFReader

    cfg = load_config(os.path.join(run, "config.yaml"), ["parallel.tensor=1", "parallel.pipeline=2"])
    layout = ParallelLayout.resolve(cfg, 2)
    init_distributed(layout, 0)
    model = build_model(cfg, layout, cfg.model.vocab_size, torch.float32)
    load_checkpoint(resolve_checkpoint(cfg.checkpoint.load), model)
    reader, worst, seen = HFReader(src), 0.0, torch.zeros(1)
    for _, gname, p in stage_parameters(model, cfg, layout):
        for key, t in hf.to_hf(gname, p.detach(), cfg.model, 128).items():
            worst = max(worst, (t - reader.get(key)).abs().max().item())
            seen += 1
    result = torch.tensor([worst])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    dist.all_reduce(seen)
    destroy_distributed()
    return result.item() if seen.item() == len(reader.keys()) else float("inf")  # every tensor on some stage


def main(src: str, run: str, export: str, out: str) -> None:
    tp = int(os.environ["WORLD_SIZE"])
    import_hf_job(src, run, None, [*FAST, f"parallel.tensor={tp}"])
    cfg = load_config(os.path.join(run, "config.yaml"), [f"parallel.tensor={tp}"])
    layout = ParallelLayout.resolve(cfg, tp)
    init_distributed(layout, 0)
    model = build_model(cfg, layout, cfg.model.vocab_size, torch.float32).eval()
    load_checkpoint(resolve_checkpoint(cfg.checkpoint.load), model)
    ref = torch.load(os.path.join(src, "ref.pt"))
    x = ref["x"]
    with torch.no_grad():
        local = model(x, torch.arange(x.shape[1]).expand_as(x), None)  # [b, s, V / TP]
    pieces = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(pieces, local.contiguous())
    logits = torch.cat(pieces, dim=-1)
    diff = (logits[..., :ref["logits"].shape[-1]] - ref["logits"]).abs().max().item()
    shard_numel = sum(p.numel() for p in model.parameters())
    rank = dist.get_rank()
    destroy_distributed()
    # the same checkpoint at PP=2: every stage's tensors are the HF tensors of its layers
    pp_diff = _check_pipeline(run, src)
    ecfg = resolve_export_config(None, run, [*FAST, f"parallel.tensor={tp}"])
    export_hf_job(ecfg, ["1.0"], export)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"tp": tp, "max_abs_diff": diff, "shard_numel": shard_numel, "pp2_max_abs_diff": pp_diff}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
