"""torchrun worker (1 process): a sorted parent loaded at TP=1 under a subnet vs the model `slice` cut.

    torchrun --nproc_per_node=1 tests/distributed/_portability_worker.py OUT.json CONFIG CKPT SLICES_DIR

CONFIG / CKPT: the sorted parent (sorted under any TP; it is re-laid for TP=1 when loaded);
SLICES_DIR: what `elastic-megatron slice` wrote from it. For every slice: the parent's elastic
forward under that slice's subnet against the sliced model's own megatron forward, on random tokens.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from elastic_megatron.config import load_config
from elastic_megatron.elastic.jobs import _parent
from elastic_megatron.elastic.model import ElasticHybrid
from elastic_megatron.elastic.subnet import Subnet
from elastic_megatron.model.hybrid import build_model
from elastic_megatron.parallel import ParallelLayout, destroy_distributed
from elastic_megatron.train.checkpoint import load_checkpoint, resolve_checkpoint


def main(out_path: str, config: str, ckpt: str, slices_dir: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(config, [f"checkpoint.load={ckpt}"])
    single = replace(cfg, parallel=replace(cfg.parallel, tensor=1, pipeline=1, data=1))
    layout, _, vocab, parent, loop = _parent(single, 1)
    parent.eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 40), generator=g)
    pos = torch.arange(40).expand(2, 40)
    results = []
    for row in json.loads((Path(slices_dir) / "slices.json").read_text()):
        s = Subnet.from_dict(row["subnet"])
        with torch.no_grad():
            want = ElasticHybrid(parent, single, layout)(tokens, pos, subnet=s)
        small_cfg = load_config(str(Path(row["path"]) / "config.yaml"))
        small = build_model(small_cfg, ParallelLayout.resolve(small_cfg, 1), vocab, torch.float32).eval()
        load_checkpoint(resolve_checkpoint(Path(row["path"]) / "checkpoints"), small)
        with torch.no_grad():
            got = small(tokens, pos, None)
        results.append({"budget": row["budget"], "subnet": row["subnet"], "max_abs_diff": float((want - got).abs().max()),
                        "max_abs_logit": float(want.abs().max()),
                        "ffn_cut": any(f < cfg.model.ffn_hidden_size for f in s.ffn)})
    json.dump({"checkpoint_layout_tp": loop.get("ffn_layout_tp"), "results": results}, open(out_path, "w"), indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
