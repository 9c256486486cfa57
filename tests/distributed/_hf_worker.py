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
    ecfg = resolve_export_config(None, run, [*FAST, f"parallel.tensor={tp}"])
    export_hf_job(ecfg, ["1.0"], export)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"tp": tp, "max_abs_diff": diff, "shard_numel": shard_numel}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
