"""Unit tests for the config tree (elastic_megatron.config), its presets in configs/, the layout
checks (elastic_megatron.parallel.ParallelLayout) and the CLI's config-error path. CPU only.

Runtime is dominated by importing megatron once (for `count_parameters`) and one CLI subprocess.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from elastic_megatron.config import (
    CONFIG_DIR,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_config,
)
from elastic_megatron.parallel import ParallelLayout

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted(CONFIG_DIR.glob("*.yaml"))

# The exact shapes of paper_notes.md §0.
PATTERN_12B = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
PATTERN_9B = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"
SHARED = dict(num_attention_heads=40, num_query_groups=8, kv_channels=128, mamba_num_heads=128,
              mamba_head_dim=80, mamba_num_groups=8, mamba_state_dim=128, vocab_size=131072,
              norm_epsilon=1e-5, max_sequence_length=131072)
SHAPES = {
    "nemotron_nano_12b_v2": dict(hybrid_override_pattern=PATTERN_12B, hidden_size=5120, ffn_hidden_size=20480,
                                 **SHARED),
    "nemotron_nano_9b_v2": dict(hybrid_override_pattern=PATTERN_9B, hidden_size=4480, ffn_hidden_size=15680,
                                **SHARED),
}
LAYER_MIX = {"nemotron_nano_12b_v2": (28, 6, 28), "nemotron_nano_9b_v2": (27, 4, 25)}  # (M, *, -)


# --------------------------------------------------------------------------- (a) presets load


def test_the_expected_presets_exist():
    assert {"tiny", "nemotron_nano_12b_v2", "nemotron_nano_9b_v2"} <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_yaml_in_configs_loads(path):
    by_path, by_name = load_config(str(path)), load_config(path.stem)
    assert isinstance(by_path, RunConfig)
    assert by_path == by_name  # a preset name resolves to configs/<name>.yaml


def test_tiny_yaml_is_the_embedded_default_written_out():
    raw = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    # every model field is written out explicitly, not left to the dataclass defaults
    assert set(raw["model"]) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert load_config("tiny").model == ModelConfig()
    assert load_config("tiny") == load_config(None)
    assert load_config("tiny").logging.out_dir == "runs/tiny"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_nemotron_presets_have_the_exact_paper_notes_shapes(name):
    cfg = load_config(name)
    m = cfg.model
    for key, value in SHAPES[name].items():
        assert getattr(m, key) == value, key
    assert tuple(m.hybrid_override_pattern.count(c) for c in "M*-") == LAYER_MIX[name]
    assert m.num_layers == sum(LAYER_MIX[name])
    assert m.mamba_num_heads * m.mamba_head_dim == 10240  # d_inner
    assert cfg.data.seq_length == 8192
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (1, 1536)
    assert cfg.train.precision == "bf16"
    assert cfg.parallel.tensor == 8
    assert cfg.data.tokenizer == "char"  # the real HF tokenizer is the user's to set (see the YAML comment)


@pytest.mark.parametrize("name, world_size", [("tiny", 1), ("tiny", 2), ("nemotron_nano_12b_v2", 64),
                                              ("nemotron_nano_9b_v2", 64)])
def test_presets_resolve_on_their_intended_layout(name, world_size):
    cfg = load_config(name)
    layout = ParallelLayout.resolve(cfg, world_size)
    assert layout.world_size == world_size
    assert layout.tensor == cfg.parallel.tensor


# --------------------------------------------------------------------------- (b) parameter counts


def _preset_params(name):
    from elastic_megatron.model.hybrid import count_parameters  # imports megatron

    m = load_config(name).model
    return count_parameters(m, m.vocab_size), 2 * m.vocab_size * m.hidden_size


def test_count_parameters_12b():
    """Closed form for the 12B (h = 5120, V = 131072) against paper_notes §0's ≈ 12.31B / 10.97B.

    By hand (d_inner = 128 x 80 = 10240, groups x state = 8 x 128 = 1024, conv_dim = 10240 + 2048 = 12288):
      Mamba layer = norm 5120 + in_proj 5120 x (2*10240 + 2*1024 + 128 = 22656) = 115,998,720
                    + conv 12288 x 4 + 12288 = 61,440 + A_log/D/dt_bias 3 x 128 = 384 + gated norm 10,240
                    + out_proj 10240 x 5120 = 52,428,800                          = 168,504,704
      attention   = norm 5120 + qkv 5120 x (5120 + 2 x 1024) = 36,700,160 + proj 5120 x 5120 = 26,214,400
                                                                                  =  62,919,680
      MLP         = norm 5120 + 2 x 5120 x 20480 = 209,715,200                    = 209,720,320
      28 x 168,504,704 + 6 x 62,919,680 + 28 x 209,720,320 = 10,967,818,752
      + embeddings 2 x 131072 x 5120 = 1,342,177,280 + final norm 5,120  =  12,310,001,152 ≈ 12.31e9
    (10,967,823,872 ≈ 10.97e9 without the two embedding matrices.)
    """
    total, embeddings = _preset_params("nemotron_nano_12b_v2")
    assert embeddings == 1_342_177_280
    assert abs(total - 12.31e9) / 12.31e9 < 0.005, total
    assert abs(total - embeddings - 10.97e9) / 10.97e9 < 0.005, total - embeddings


def test_count_parameters_9b():
    """Closed form for the 9B (h = 4480, same Mamba/attention shapes) against paper_notes §0's ≈ 8.89B.

    By hand (d_inner 10240, conv_dim 12288, in_proj width 22656 as for the 12B):
      Mamba layer = norm 4480 + in_proj 4480 x 22656 = 101,498,880 + conv 61,440 + 384 + gated norm 10,240
                    + out_proj 10240 x 4480 = 45,875,200                          = 147,450,624
      attention   = norm 4480 + qkv 4480 x 7168 = 32,112,640 + proj 5120 x 4480 = 22,937,600
                                                                                  =  55,054,720
      MLP         = norm 4480 + 2 x 4480 x 15680 = 140,492,800                    = 140,497,280
      27 x 147,450,624 + 4 x 55,054,720 + 25 x 140,497,280 = 7,713,817,728
      + embeddings 2 x 131072 x 4480 = 1,174,405,120 + final norm 4,480  =  8,888,227,328 ≈ 8.89e9
    """
    total, embeddings = _preset_params("nemotron_nano_9b_v2")
    assert embeddings == 1_174_405_120
    assert abs(total - 8.89e9) / 8.89e9 < 0.005, total


# --------------------------------------------------------------------------- (c) bad configs

# (overrides, offending key as it must appear in the message, other substrings the message must hold)
BAD_OVERRIDES = [
    pytest.param(["train.lrr=1"], "train.lrr", ["unknown key", "allowed keys", "min_lr", "global_batch_size"],
                 id="unknown-key-lists-allowed"),
    pytest.param(["foo=1"], "foo", ["unknown key", "model, parallel, data, train, checkpoint, logging"],
                 id="unknown-section"),
    pytest.param(["train.lr=abc"], "train.lr", ["abc"], id="wrong-type-float"),
    pytest.param(["train.steps=1.5"], "train.steps", ["1.5"], id="wrong-type-int"),
    pytest.param(["logging.progress=maybe"], "logging.progress", ["maybe"], id="wrong-type-bool"),
    pytest.param(["model.hybrid_override_pattern=MX"], "model.hybrid_override_pattern", ["'MX'"],
                 id="bad-pattern"),
    pytest.param(["model.num_query_groups=3"], "model.num_query_groups", ["model.num_attention_heads (8)"],
                 id="query-groups-vs-heads"),
    pytest.param(["model.mamba_num_groups=3"], "model.mamba_num_groups", ["model.mamba_num_heads (16)"],
                 id="mamba-groups-vs-heads"),
    pytest.param(["model.hidden_size=0"], "model.hidden_size", ["> 0"], id="zero-hidden"),
    pytest.param(["data.source=foo"], "data.source", ["'foo'", "synthetic, indexed"], id="bad-choice"),
    pytest.param(["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size",
                 ["multiple of train.micro_batch_size (4)"], id="global-vs-micro"),
    pytest.param(["parallel.context=2"], "parallel.context", ["not supported"], id="context-parallel"),
    pytest.param(["parallel.expert=2"], "parallel.expert", ["MoE"], id="expert-parallel"),
    pytest.param(["data.seq_length=8192"], "data.seq_length", ["8192", "model.max_sequence_length (4096)"],
                 id="seq-over-max"),
    pytest.param(["train.min_lr=1e-2"], "train.min_lr", ["min_lr=0.01"], id="min-lr-over-lr"),
    pytest.param(["train.lr=-1"], "train.lr", ["> 0"], id="negative-lr"),
    pytest.param(["train.adam_beta2=1.5"], "train.adam_beta2", ["1.5"], id="beta2-out-of-range"),
    pytest.param(["train.eval_batches=-1"], "train.eval_batches", [">= 0"], id="negative-eval-batches"),
    pytest.param(["train.lr"], "train.lr", ["expected key=value"], id="override-without-equals"),
    pytest.param(["data.source=indexed"], "data.paths", ["data.source=indexed"], id="indexed-without-paths"),
    pytest.param(["distill.intermediate_layers=[3,10]"], "distill.intermediate_layers", ["[10]", "0..9"],
                 id="intermediate-layer-out-of-range"),
    pytest.param(["distill.intermediate_weight=-1"], "distill.intermediate_weight", [">= 0"],
                 id="negative-intermediate-weight"),
    pytest.param(['elastic.subnets=["","ffn=0.5"]'], "elastic.subnets", ["one per budget"], id="subnets-count"),
    pytest.param(['elastic.subnets=["","heads=0.5",""]'], "elastic.subnets", ["unknown axis"], id="subnet-axis"),
    pytest.param(["parallel.tensor=4", "parallel.sequence_parallel=true", "data.seq_length=130"], "data.seq_length",
                 ["130", "multiple of parallel.tensor (4)"], id="sp-seq-not-divisible"),
    pytest.param(["parallel.tensor=4", "parallel.sequence_parallel=true", "curriculum.1.seq_length=766"],
                 "curriculum.1.seq_length", ["766", "parallel.sequence_parallel"], id="sp-stage-seq-not-divisible"),
    pytest.param(["curriculum.0.recompute=some"], "curriculum.0.recompute", ["'some'", "none, full"],
                 id="stage-recompute"),
]


def _assert_one_line_naming(exc: pytest.ExceptionInfo, key: str, contains: list[str]) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert f"'{key}'" in msg, msg
    for part in contains:
        assert part in msg, msg


@pytest.mark.parametrize("overrides, key, contains", BAD_OVERRIDES)
def test_bad_override_is_a_one_line_config_error_naming_the_key(overrides, key, contains):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    _assert_one_line_naming(exc, key, contains)


# (YAML text, offending key or None for "the file itself", other substrings)
BAD_FILES = [
    pytest.param("model:\n  hiden_size: 5\n", "model.hiden_size", ["unknown key", "hidden_size"],
                 id="yaml-unknown-nested-key"),
    pytest.param("train: {lr: [1, 2]}\n", "train.lr", ["ListConfig"], id="yaml-wrong-type"),
    pytest.param("train: {lr: 1e-3\n", None, ["invalid YAML", "line 2"], id="yaml-syntax-error"),
    pytest.param("- model\n- train\n", None, ["top level must be a mapping"], id="yaml-top-level-list"),
]


@pytest.mark.parametrize("text, key, contains", BAD_FILES)
def test_bad_yaml_file_is_a_one_line_config_error(tmp_path, text, key, contains):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    _assert_one_line_naming(exc, key or str(path), contains)


def test_missing_config_file_lists_the_presets():
    with pytest.raises(ConfigError) as exc:
        load_config("no_such_preset")
    _assert_one_line_naming(exc, "no_such_preset", ["not found", "presets: nemotron_nano_12b_v2, "
                                                    "nemotron_nano_9b_v2, tiny"])


# (overrides, world size, offending key, substrings): load_config accepts these; the layout does not.
BAD_LAYOUTS = [
    pytest.param(["parallel.tensor=3"], 3, "model.mamba_num_heads", ["mamba heads 16 not divisible by TP 3"],
                 id="mamba-heads-vs-tp"),
    pytest.param(["parallel.tensor=2"], 3, "parallel.tensor", ["does not divide the world size 3"],
                 id="tp-pp-vs-world"),
    pytest.param(["parallel.data=3"], 4, "parallel.data", ["!= world size 4"], id="explicit-dp-vs-world"),
    pytest.param(["parallel.pipeline=2", "parallel.layers_in_first_stage=20"], 2, "parallel.layers_in_first_stage",
                 ["first=20", "10 layers over 2 stages"], id="bad-uneven-split"),
    pytest.param(["parallel.pipeline=3"], 3, "parallel.pipeline", ["do not split evenly over 3 stages"],
                 id="layers-vs-pp"),
    pytest.param(["parallel.layers_in_first_stage=4"], 1, "parallel.layers_in_first_stage",
                 ["parallel.pipeline > 1"], id="uneven-without-pp"),
    pytest.param(["train.global_batch_size=16", "train.micro_batch_size=8"], 4, "train.global_batch_size",
                 ["micro_batch_size x DP = 8 x 4"], id="global-vs-micro-times-dp"),
    pytest.param(["model.vocab_size=100"], 1, "model.vocab_size", ["make_vocab_size_divisible_by x TP = 8"],
                 id="vocab-vs-tp"),
    pytest.param(["parallel.backend=nccl"], 1, "parallel.backend", ["CUDA"], id="nccl-without-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
]


@pytest.mark.parametrize("overrides, world_size, key, contains", BAD_LAYOUTS)
def test_bad_layout_is_a_one_line_config_error_naming_the_key(overrides, world_size, key, contains):
    cfg = load_config(None, overrides)  # valid on its own
    with pytest.raises(ConfigError) as exc:
        ParallelLayout.resolve(cfg, world_size)
    _assert_one_line_naming(exc, key, contains)


# --------------------------------------------------------------------------- (d) the CLI


CLI_CMD = [sys.executable, "-X", "importtime", "-m", "elastic_megatron.cli", "train", "train.lrr=1"]


@pytest.fixture(scope="module", autouse=True)
def _cli_bad_key_proc(tmp_path_factory):
    """`python -m elastic_megatron.cli train train.lrr=1` (-X importtime: report what it imported),
    started at this module's first test so that it runs while the other tests do."""
    out_dir = tmp_path_factory.mktemp("cli")
    with open(out_dir / "stdout", "w") as out, open(out_dir / "stderr", "w") as err:
        proc = subprocess.Popen(CLI_CMD, cwd=REPO, stdout=out, stderr=err, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    yield proc, out_dir
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cli_bad_key(_cli_bad_key_proc):
    proc, out_dir = _cli_bad_key_proc
    returncode = proc.wait(timeout=120)
    stdout, lines = (out_dir / "stdout").read_text(), (out_dir / "stderr").read_text().splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    stderr = [line for line in lines if not line.startswith("import time:")]
    return returncode, stdout, imported, stderr


PREFIX = "elastic-megatron: error: config key 'train.lrr'"


def test_cli_config_error_exits_2_with_the_error_line(cli_bad_key):
    returncode, stdout, _, stderr = cli_bad_key
    assert returncode == 2, stderr[-20:]
    errors = [line for line in stderr if line.startswith("elastic-megatron: error:")]
    assert len(errors) == 1 and errors[0].startswith(PREFIX), stderr
    assert "allowed keys here:" in errors[0] and "global_batch_size" in errors[0]
    assert stdout == ""




def test_cli_config_error_is_the_only_stderr_line(cli_bad_key):
    returncode, _, _, stderr = cli_bad_key
    assert returncode == 2
    assert len(stderr) == 1 and stderr[0].startswith(PREFIX), stderr


def test_cli_config_error_is_raised_before_megatron_is_imported(cli_bad_key):
    _, _, imported, _ = cli_bad_key
    assert "elastic_megatron.config" in imported  # the importtime report is there at all
    assert not {name for name in imported if name == "megatron" or name.startswith("megatron.")}


# --------------------------------------------------------------------------- (e) overrides


def test_dotted_override_sets_a_nested_field_and_nothing_else():
    cfg = load_config(None, ["model.hidden_size=256", "data.paths=[a,b]", "parallel.layers_in_first_stage=3"])
    assert cfg.model.hidden_size == 256
    assert cfg.data.paths == ["a", "b"]
    assert cfg.parallel.layers_in_first_stage == 3
    assert dataclasses.replace(cfg.model, hidden_size=ModelConfig().hidden_size) == ModelConfig()
    assert cfg.train == TrainConfig()


def test_override_wins_over_yaml_and_yaml_over_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  min_lr: 1.0e-4\nmodel:\n  hidden_size: 256\n")
    from_yaml = load_config(str(path))
    assert (from_yaml.train.lr, from_yaml.model.hidden_size) == (1e-3, 256)
    assert from_yaml.train.steps == TrainConfig().steps  # unset keys keep their defaults
    cfg = load_config(str(path), ["train.lr=2e-3"])
    assert cfg.train.lr == 2e-3  # override beats YAML
    assert cfg.model.hidden_size == 256  # YAML kept where not overridden
    assert load_config(str(path), ["train.lr=2e-3", "train.lr=5e-4"]).train.lr == 5e-4  # last override wins


def test_override_on_a_preset():
    cfg = load_config("nemotron_nano_12b_v2", ["parallel.tensor=4", "data.seq_length=4096"])
    assert (cfg.parallel.tensor, cfg.data.seq_length) == (4, 4096)
    assert cfg.model.hidden_size == 5120 and cfg.data == dataclasses.replace(DataConfig(), seq_length=4096)
