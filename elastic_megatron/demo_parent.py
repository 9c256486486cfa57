"""The demo's parent, shipped trained: the demo starts from it as users start from a released parent.

`elastic-megatron demo` needs a trained parent before the method has anything to do. Training the
tiny one (500 short-problem steps, then 150 at 256 tokens) took 6-8 of the demo's 10-12.5 minutes
on a 2-core CPU, and the family needs all of those steps (fewer cost it 0.03-0.12 short accuracy,
docs/results.md). So the package ships those weights, the way the real recipe starts from
NVIDIA-Nemotron-Nano-12B-v2 instead of pre-training it:

    elastic_megatron/assets/demo_parent/
        recipe.json     what the weights are a function of (both phases' model, data, train and
                        parallel config), their held-out loss, and every file's sha256
        checkpoint/     the weights, a megatron dist checkpoint without optimizer state (the
                        canonical keys of model/weights.py, so either layer spec loads it)

The demo uses them only when its own parent recipe is that one, to the last field: any override
that changes the parent (a seed, a model size, a data or training field) trains the parent as
before, and so does `elastic-megatron demo --train-parent`. The shipped weights are the demo's own
training run, bit for bit (fp32, CPU; two gloo ranks train the same weights as one process).
`python benchmarks/demo_parent.py --check` retrains them and compares; `--write` replaces them
after the recipe changes (tests/unit/test_demo_parent.py fails until then).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .config import RunConfig, to_dict, to_yaml

ASSET = Path(__file__).parent / "assets" / "demo_parent"
# The sections that decide the parent's weights. logging (paths, W&B) and checkpoint (where it is
# saved, and the short phase's checkpoint the long phase loads) do not; the elastic sections are
# read only after the parent exists.
RECIPE_SECTIONS = ("model", "data", "train", "parallel")
MARKER = "shipped.json"  # in a parent run directory: `install` laid it out


def phase_recipe(cfg: RunConfig) -> dict:
    """One training phase as the plain config fields that decide the weights it trains."""
    return {k: v for k, v in to_dict(cfg).items() if k in RECIPE_SECTIONS}


def recipe(short_cfg: RunConfig, long_cfg: RunConfig) -> dict:
    """The demo parent's two training phases."""
    return {"short": phase_recipe(short_cfg), "long": phase_recipe(long_cfg)}


def shipped_recipe() -> dict | None:
    """recipe.json of the shipped parent, or None where the package has none (e.g. a slim install)."""
    path = ASSET / "recipe.json"
    return json.loads(path.read_text()) if path.exists() else None


def shipped_for(short_cfg: RunConfig, long_cfg: RunConfig) -> bool:
    """Whether the shipped weights are what these two phases would train."""
    saved = shipped_recipe()
    return saved is not None and saved["recipe"] == recipe(short_cfg, long_cfg)


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by its path relative to root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def install(long_cfg: RunConfig) -> Path:
    """Lay the shipped parent out as the demo's own finished parent run (long_cfg.logging.out_dir:
    config.yaml, checkpoints/iter_N and the `latest` marker), after checking every file against
    recipe.json. Returns the checkpoint directory."""
    from .config import ConfigError

    saved = shipped_recipe()
    src = ASSET / "checkpoint"
    if saved is None or _files(src) != saved["sha256"]:
        raise ConfigError(f"the shipped demo parent in {ASSET} is incomplete or altered (its files do not match "
                          "recipe.json): restore it from git, or run the demo with --train-parent")
    run = Path(long_cfg.logging.out_dir)
    root = run / "checkpoints"
    ckpt = root / f"iter_{long_cfg.train.steps:07d}"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(src, ckpt)
    (root / "latest").write_text(ckpt.name)
    (run / "config.yaml").write_text(to_yaml(long_cfg))
    (run / MARKER).write_text(json.dumps({"from": str(ASSET)}))
    return ckpt


def installed(run: str | Path) -> bool:
    """Whether the parent run directory `run` holds the shipped parent, laid out by `install`."""
    return (Path(run) / MARKER).exists()


@contextmanager
def loaded_parent(cfg: RunConfig, ckpt: Path):
    """The parent model of `cfg` holding the weights of checkpoint `ckpt`, in fp32 in one process
    (the jobs' own parent loader, elastic/jobs.py)."""
    from .elastic.jobs import _parent
    from .parallel import destroy_distributed

    fp32 = replace(cfg, train=replace(cfg.train, precision="fp32"), checkpoint=replace(cfg.checkpoint, load=str(ckpt)))
    try:
        yield _parent(fp32, 1)[3]
    finally:
        destroy_distributed()


def write_asset(short_cfg: RunConfig, long_cfg: RunConfig, trained: Path, heldout_loss: float,
                dest: Path = ASSET) -> dict:
    """Ship the parent trained in `trained` (the long phase's checkpoint): its weights without the
    optimizer state, and recipe.json. For benchmarks/demo_parent.py --write."""
    from .train.checkpoint import save_checkpoint

    tmp = dest.parent / (dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with loaded_parent(long_cfg, trained) as model:
        saved = save_checkpoint(tmp, long_cfg.train.steps, model, None, {"step": long_cfg.train.steps})
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.move(str(saved), dest / "checkpoint")
    shutil.rmtree(tmp)
    meta = {"recipe": recipe(short_cfg, long_cfg), "heldout_loss": heldout_loss,
            "sha256": _files(dest / "checkpoint")}
    (dest / "recipe.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta
