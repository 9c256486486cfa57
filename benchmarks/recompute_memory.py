"""Peak process memory of an elastic training step with and without activation recomputation.

    python benchmarks/recompute_memory.py [--seq 2048] [--batch 2]

For each of train.recompute=none / full, a fresh process builds the medium parent of
benchmarks/elastic_cost.py (53M parameters), runs two elastic steps (forward with labels at the
full size and at ~50%, backward, as the elastic forward runs in training) and reports its peak
resident memory above the level right after the model was built (`ru_maxrss`, Linux KiB). The
two processes run one after the other, so the numbers sit side by side in one run. Prints one
JSON line. A CPU measurement: it shows what recomputation removes (saved activations), not GPU
allocator behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(mode: str, seq: int, batch: int) -> dict:
    import torch

    from elastic_megatron.config import load_config
    from elastic_megatron.elastic.model import ElasticHybrid
    from elastic_megatron.elastic.subnet import Subnet, homogeneous_for_target
    from elastic_megatron.model.hybrid import build_model, count_parameters
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed

    sys.path.insert(0, str(REPO / "benchmarks"))
    from elastic_cost import MEDIUM, VOCAB

    cfg = load_config(None, [*MEDIUM, f"train.recompute={mode}", f"model.max_sequence_length={max(seq, 4096)}"])
    layout = ParallelLayout.resolve(cfg, 1)
    init_distributed(layout, cfg.train.seed)
    try:
        model = build_model(cfg, layout, VOCAB, torch.float32).train()
        for p in model.parameters():  # gradients allocated up front: the step adds only activations
            p.grad = torch.zeros_like(p)
        view = ElasticHybrid(model, cfg, layout)
        params = count_parameters(cfg.model, VOCAB)
        half = homogeneous_for_target(cfg.model, VOCAB, 0.5 * params)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (batch, seq), generator=g)
        labels = torch.randint(0, VOCAB, (batch, seq), generator=g)
        pos = torch.arange(seq).expand(batch, seq)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        losses = []
        for s in (Subnet.full(cfg.model), half):
            loss = view(tokens, pos, labels, subnet=s).mean()
            loss.backward()
            losses.append(float(loss))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"mode": mode, "step_peak_mib": round((peak - base) / 1024, 1), "losses": losses, "params": params}
    finally:
        destroy_distributed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--child", default="")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.seq, a.batch)))
        return
    res = {}
    for mode in ("none", "full"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(29730 + len(res))}
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--seq", str(a.seq), "--batch", str(a.batch)],
                             env=env, capture_output=True, text=True, check=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({"seq": a.seq, "batch": a.batch, "params": res["none"]["params"],
                      "step_peak_mib": {m: r["step_peak_mib"] for m, r in res.items()},
                      "full_vs_none": round(res["full"]["step_peak_mib"] / res["none"]["step_peak_mib"], 3),
                      "same_losses": res["none"]["losses"] == res["full"]["losses"]}))


if __name__ == "__main__":
    main()
