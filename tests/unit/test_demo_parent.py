"""The demo's shipped parent (elastic_megatron/demo_parent.py): used only for its own recipe, laid out
as the demo's finished parent run, checked file by file, and the weights the recipe trained.

That the shipped weights are the recipe's training run bit for bit takes the 650 training steps
(~7 min): `python benchmarks/demo_parent.py --check`, not this suite. Here: the held-out loss the
demo measured on the trained parent, from the installed copy."""

from __future__ import annotations

import shutil

import pytest

from elastic_megatron import demo, demo_parent
from elastic_megatron.config import ConfigError, load_config, to_yaml


def _phases(tmp_path, *overrides):
    return demo.parent_configs(demo.demo_config(tmp_path, list(overrides)), tmp_path)


def test_the_shipped_parent_is_the_demos_recipe(tmp_path):
    """Fails when the demo's parent recipe changes without the asset: run benchmarks/demo_parent.py --write."""
    saved = demo_parent.shipped_recipe()
    assert saved is not None, f"no recipe.json in {demo_parent.ASSET}"
    assert saved["recipe"] == demo_parent.recipe(*_phases(tmp_path))
    assert demo_parent.shipped_for(*_phases(tmp_path))
    assert demo.parent_plan(*_phases(tmp_path), train_parent=False) == "shipped"


@pytest.mark.parametrize("override", ["train.seed=4321", "train.steps=400", "train.lr=6e-3", "data.seq_length=96",
                                      "model.ffn_hidden_size=512", "parallel.tensor=2"])
def test_an_override_of_the_parent_trains_it(tmp_path, override):
    assert not demo_parent.shipped_for(*_phases(tmp_path, override))
    assert demo.parent_plan(*_phases(tmp_path, override), train_parent=False) == "trained"


@pytest.mark.parametrize("override", ["elastic.importance_batches=2", "curriculum.0.steps=60",
                                      "logging.wandb_mode=disabled", "logging.progress=false"])
def test_an_override_after_the_parent_keeps_the_shipped_one(tmp_path, override):
    assert demo.parent_plan(*_phases(tmp_path, override), train_parent=False) == "shipped"


def test_train_parent_trains_it_even_for_its_recipe(tmp_path):
    short_cfg, long_cfg = _phases(tmp_path)
    assert demo.parent_plan(short_cfg, long_cfg, train_parent=True) == "trained"
    demo_parent.install(long_cfg)  # also over a shipped parent installed by an earlier demo
    assert demo.parent_plan(short_cfg, long_cfg, train_parent=False) == "reused, shipped"
    assert demo.parent_plan(short_cfg, long_cfg, train_parent=True) == "trained"


def test_install_lays_out_the_trained_parent(tmp_path):
    """The installed copy is a finished parent run the rest of the demo reads, and it is the parent
    the demo trained: the same held-out loss (to the last bit on the box that trained it)."""
    from elastic_megatron.train.checkpoint import latest_checkpoint, loop_state

    short_cfg, long_cfg = _phases(tmp_path)
    ckpt = demo_parent.install(long_cfg)
    assert latest_checkpoint(tmp_path / "parent" / "checkpoints") == ckpt
    assert loop_state(ckpt)["step"] == long_cfg.train.steps == 150
    assert demo.phase_finished(long_cfg) and demo.parent_plan(short_cfg, long_cfg, False) == "reused, shipped"
    got = demo.evaluate_model(str(tmp_path / "parent"), 0, 0, long_cfg.train.seed)["heldout_loss"]
    # equal here, where it was measured; another CPU's BLAS may round the last bits of the forward
    # differently. A wrong or half-loaded parent is off by far more (an untrained one: ~4.0)
    assert got == pytest.approx(demo_parent.shipped_recipe()["heldout_loss"], rel=1e-5)
    assert demo_parent.installed(tmp_path / "parent")


def test_an_altered_shipped_file_is_one_clear_error(tmp_path, monkeypatch):
    copy = tmp_path / "asset"
    shutil.copytree(demo_parent.ASSET, copy)
    monkeypatch.setattr(demo_parent, "ASSET", copy)
    weights = copy / "checkpoint" / "__0_0.distcp"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    _, long_cfg = _phases(tmp_path / "out")
    with pytest.raises(ConfigError, match="incomplete or altered .* --train-parent"):
        demo_parent.install(long_cfg)
    assert not (tmp_path / "out" / "parent").exists()  # nothing laid out


def test_a_parent_directory_of_another_seed_is_refused(tmp_path):
    """A DIR/parent trained with another seed is not reused as this demo's parent (it was, when only
    the data and the step count were compared)."""
    short_cfg, long_cfg = _phases(tmp_path)
    demo_parent.install(long_cfg)
    other = load_config(str(tmp_path / "parent" / "config.yaml"), ["train.seed=7"])
    (tmp_path / "parent" / "config.yaml").write_text(to_yaml(other))
    with pytest.raises(ConfigError, match="holds another run"):
        demo.parent_plan(short_cfg, long_cfg, False)


def test_the_cli_takes_train_parent():
    from elastic_megatron.cli import build_parser

    args = build_parser().parse_args(["demo", "--train-parent", "--out", "x", "train.seed=7"])
    assert args.train_parent is True and args.overrides == ["train.seed=7"]
    assert build_parser().parse_args(["demo"]).train_parent is False
