"""The demo's shipped parent (elastic_megatron/assets/demo_parent): check it is what the recipe trains, or replace it.

    python benchmarks/demo_parent.py --check                  # train the demo's parent here (~6-8 min on
                                                              # 2 cores) and compare it with the shipped one
    python benchmarks/demo_parent.py --from DIR --check       # compare a finished demo's DIR/parent instead
    python benchmarks/demo_parent.py --from DIR --write       # ship DIR/parent (after the recipe changed)

The comparison is every parameter bit for bit (fp32), and the held-out loss the demo reports. A
parent trained on another machine may differ in the last bits (another BLAS, another rounding);
--check then says by how much, which is the machine, not the recipe. The last line of stdout is a
JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron import demo, demo_parent  # noqa: E402
from elastic_megatron.train.checkpoint import latest_checkpoint  # noqa: E402


def _weights(cfg, ckpt: Path) -> dict[str, torch.Tensor]:
    with demo_parent.loaded_parent(cfg, ckpt) as model:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", default="", help="a demo output directory whose parent/ is finished")
    p.add_argument("--check", action="store_true", help="compare with the shipped parent")
    p.add_argument("--write", action="store_true", help="ship this parent (replaces the asset)")
    p.add_argument("overrides", nargs="*", help="demo overrides (the recipe must stay the demo's to --write)")
    a = p.parse_args()
    if not (a.check or a.write):
        p.error("give --check, --write or both")
    work = Path(a.src) if a.src else Path(tempfile.mkdtemp(prefix="demo_parent_"))
    cfg = demo.demo_config(work, a.overrides)
    short_cfg, long_cfg = demo.parent_configs(cfg, work)
    if not demo.phase_finished(long_cfg):
        if a.src:
            p.error(f"{work / 'parent'} is not a finished parent run of the demo's recipe")
        from elastic_megatron.local_ranks import local_ranks

        threads = torch.get_num_threads()
        ranks = local_ranks(cfg, threads)
        demo.train_parent_phases(short_cfg, long_cfg, ranks, threads // ranks)
    trained = latest_checkpoint(work / "parent" / "checkpoints")
    loss = demo.evaluate_model(str(work / "parent"), 0, 0, cfg.train.seed)["heldout_loss"]
    summary = {"trained": str(trained), "heldout_loss": loss}
    if a.check:
        saved = demo_parent.shipped_recipe()
        if saved is None:
            summary["check"] = "no shipped parent"
        elif saved["recipe"] != demo_parent.recipe(short_cfg, long_cfg):
            summary["check"] = "the shipped parent has another recipe (run --write)"
        else:
            mine = _weights(long_cfg, trained)
            theirs = _weights(long_cfg, demo_parent.ASSET / "checkpoint")
            diff = {k: float((mine[k] - theirs[k]).abs().max()) for k in mine}
            summary.update(check="same" if all(torch.equal(mine[k], theirs[k]) for k in mine) else "differs",
                           max_abs_diff=max(diff.values()), shipped_heldout_loss=saved["heldout_loss"])
    if a.write:
        meta = demo_parent.write_asset(short_cfg, long_cfg, trained, loss)
        summary["written"] = {"dir": str(demo_parent.ASSET), "files": len(meta["sha256"]),
                              "bytes": sum(f.stat().st_size for f in (demo_parent.ASSET / "checkpoint").rglob("*"))}
    if not a.src:  # the parent trained here, ~30 MB with its optimizer state
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))
    return 0 if summary.get("check", "same") == "same" else 1


if __name__ == "__main__":
    sys.exit(main())
