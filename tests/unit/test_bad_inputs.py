"""Bad inputs across every command: each ends in one clear line, exit 2, and leaves nothing on disk.

The cases run through the console script's `main()` in this process (stderr captured at the file
descriptor, so anything megatron or torch would print there counts too); the signal cases run the real
console script. The table of cases, messages and exit codes is written into docs/results.md (between
the `bad-inputs` markers) by the last test here, so the documentation is what was measured.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import FAST, REPO, stderr_lines

TINY = [*FAST, "data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=2"]
RESULTS = REPO / "docs" / "results.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


@dataclass
class Case:
    group: str
    what: str                                   # the bad input, as the table says it
    argv: Callable[[Path], list[str]]           # workspace -> the command's arguments
    words: tuple[str, ...] = ()                 # the message must name these
    rc: int = 2
    outputs: Callable[[Path], list[Path]] = field(default=lambda ws: [])  # must not exist afterwards


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a trained tiny parent, its sorted copy, a truncated and an empty checkpoint, bad
    data files and broken Hugging Face directories."""
    from elastic_megatron.cli import main
    from elastic_megatron.data.prepare import write_synthetic_jsonl

    root = tmp_path_factory.mktemp("bad")
    assert main(["train", *TINY, "train.steps=1", f"logging.out_dir={root / 'parent'}"]) == 0
    assert main(["importance", *TINY, "elastic.importance_batches=1", f"checkpoint.load={root / 'parent'}",
                 f"logging.out_dir={root / 'imp'}"]) == 0
    shutil.copytree(root / "parent", root / "truncated")
    shard = sorted((root / "truncated" / "checkpoints").rglob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 10])  # model and optimizer cut
    (root / "empty_ckpt").mkdir()
    write_synthetic_jsonl(str(root / "good.jsonl"), 4, seed=1)
    _write(root / "empty.jsonl", "")
    _write(root / "blank.jsonl", "\n\n")
    _write(root / "notext.jsonl", '{"text": "ok"}\n{"text": 3}\n')
    _write(root / "malformed.jsonl", '{"text": "1+1=2"}\n{"text": "unterminated\n')
    _write(root / "nokey.jsonl", '{"body": "1+1=2"}\n')
    _write(root / "notobject.jsonl", '["1+1=2"]\n')
    _write(root / "bad.yaml", "model: [unclosed\n")
    _write(root / "list.yaml", "- model\n- train\n")
    (root / "hf_empty").mkdir()
    _write(root / "hf_badjson" / "config.json", "{not json")
    hf_config = {"model_type": "nemotron_h", "vocab_size": 128, "hidden_size": 64,
                 "layers_block_type": ["linear_attention", "mlp", "full_attention", "mlp"],
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
                 "mamba_num_heads": 8, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 16}
    _write(root / "hf_noweights" / "config.json", json.dumps(hf_config))
    _write(root / "hf_moe" / "config.json", json.dumps({**hf_config, "layers_block_type": ["linear_attention", "moe"]}))
    _write(root / "hf_truncated" / "config.json", json.dumps(hf_config))
    _write(root / "hf_truncated" / "model.safetensors", '{"__metadata__"')  # a header cut short
    return root


def _sorted(ws: Path) -> str:
    return str(ws / "imp" / "sorted")


_HELD: list[socket.socket] = []


def _busy_port() -> str:
    """A port another listener holds for the whole module."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _HELD.append(sock)
    return str(sock.getsockname()[1])


CASES = [
    # ---- configs
    Case("config", "unknown config key", lambda ws: ["train", "train.stpes=5"], ("train.stpes",)),
    Case("config", "value of the wrong type", lambda ws: ["train", "train.steps=many"], ("train.steps", "many")),
    Case("config", "value out of range", lambda ws: ["train", "train.steps=-3"], ("train.steps",)),
    Case("config", "config file that does not exist", lambda ws: ["train", "--config", str(ws / "nowhere.yaml")],
         ("nowhere.yaml",)),
    Case("config", "malformed YAML", lambda ws: ["train", "--config", str(ws / "bad.yaml")], ("bad.yaml",)),
    Case("config", "YAML that is not a mapping", lambda ws: ["train", "--config", str(ws / "list.yaml")],
         ("list.yaml",)),
    Case("config", "override without '='", lambda ws: ["train", "train.steps"], ("train.steps",)),
    Case("config", "unknown command", lambda ws: ["trian"], ("trian",)),
    Case("config", "unknown option", lambda ws: ["train", "--stpes", "3"], ("--stpes",)),
    Case("config", "layer pattern with an unknown symbol", lambda ws: ["train", "model.hybrid_override_pattern=M-X*"],
         ("hybrid_override_pattern",)),
    Case("config", "heads that do not divide into groups", lambda ws: ["train", "model.num_query_groups=3"],
         ("num_query_groups",)),
    Case("config", "TP larger than the world", lambda ws: ["train", *TINY, "parallel.tensor=2",
                                                             f"logging.out_dir={ws / 'run_tp'}"],
         ("parallel.tensor",), outputs=lambda ws: [ws / "run_tp"]),
    Case("config", "demo: unknown override", lambda ws: ["demo", "--out", str(ws / "demo_a"), "train.stepz=4"],
         ("config key 'train.stepz'",), outputs=lambda ws: [ws / "demo_a"]),
    Case("config", "budget above 1", lambda ws: ["train", "elastic.budgets=[1.5]"], ("elastic.budgets", "1.5")),
    # ---- checkpoints
    Case("checkpoint", "train: checkpoint.load does not exist",
         lambda ws: ["train", *TINY, f"checkpoint.load={ws / 'nowhere'}", f"logging.out_dir={ws / 'run_a'}"],
         ("nowhere",), outputs=lambda ws: [ws / "run_a"]),
    Case("checkpoint", "importance: checkpoint.load does not exist",
         lambda ws: ["importance", *TINY, f"checkpoint.load={ws / 'nowhere'}", f"logging.out_dir={ws / 'imp_a'}"],
         ("nowhere",), outputs=lambda ws: [ws / "imp_a"]),
    Case("checkpoint", "empty checkpoint directory",
         lambda ws: ["importance", *TINY, f"checkpoint.load={ws / 'empty_ckpt'}", f"logging.out_dir={ws / 'imp_b'}"],
         ("empty_ckpt",), outputs=lambda ws: [ws / "imp_b"]),
    Case("checkpoint", "truncated .distcp shard",
         lambda ws: ["importance", *TINY, "elastic.importance_batches=1", f"checkpoint.load={ws / 'truncated'}",
                     f"logging.out_dir={ws / 'imp_c'}"], ("truncated",), outputs=lambda ws: [ws / "imp_c"]),
    Case("checkpoint", "truncated checkpoint to resume from",
         lambda ws: ["train", *TINY, "train.steps=2", f"logging.out_dir={ws / 'truncated'}"], ("truncated",)),
    Case("checkpoint", "checkpoint of another model (hidden size)",
         lambda ws: ["importance", *TINY, "model.hidden_size=96", "model.kv_channels=12", "model.ffn_hidden_size=384",
                     f"checkpoint.load={ws / 'parent'}", f"logging.out_dir={ws / 'imp_d'}"],
         ("parent", "model"), outputs=lambda ws: [ws / "imp_d"]),
    Case("checkpoint", "elastic-train without a parent", lambda ws: ["elastic-train", *TINY,
                                                                      f"logging.out_dir={ws / 'el_a'}"],
         ("checkpoint.load", "elastic-megatron importance"), outputs=lambda ws: [ws / "el_a"]),
    Case("checkpoint", "elastic-train on an unsorted parent",
         lambda ws: ["elastic-train", *TINY, f"checkpoint.load={ws / 'parent'}", f"logging.out_dir={ws / 'el_b'}"],
         ("importance",), outputs=lambda ws: [ws / "el_b"]),
    Case("checkpoint", "slice --checkpoint that does not exist",
         lambda ws: ["slice", "--checkpoint", str(ws / "nowhere"), "--out", str(ws / "fam_a")], ("nowhere", "does not exist"),
         outputs=lambda ws: [ws / "fam_a"]),
    Case("checkpoint", "export-hf --checkpoint that does not exist",
         lambda ws: ["export-hf", "--checkpoint", str(ws / "nowhere"), "--out", str(ws / "hf_a")], ("nowhere",),
         outputs=lambda ws: [ws / "hf_a"]),
    Case("checkpoint", "export-hf without --checkpoint or --config",
         lambda ws: ["export-hf", "--out", str(ws / "hf_b")], ("--checkpoint",), outputs=lambda ws: [ws / "hf_b"]),
    # ---- data
    Case("data", "prepare-data: input file missing",
         lambda ws: ["prepare-data", "--input", str(ws / "nowhere.jsonl"), "--output", str(ws / "d_a")],
         ("nowhere.jsonl", "not found"), outputs=lambda ws: [ws / "d_a.bin", ws / "d_a.idx"]),
    Case("data", "prepare-data: empty JSONL",
         lambda ws: ["prepare-data", "--input", str(ws / "empty.jsonl"), "--output", str(ws / "d_b")],
         ("no documents",), outputs=lambda ws: [ws / "d_b.bin", ws / "d_b.idx"]),
    Case("data", "prepare-data: only blank lines",
         lambda ws: ["prepare-data", "--input", str(ws / "blank.jsonl"), "--output", str(ws / "d_g")],
         ("no documents",), outputs=lambda ws: [ws / "d_g.bin", ws / "d_g.idx"]),
    Case("data", "prepare-data: text that is not a string",
         lambda ws: ["prepare-data", "--input", str(ws / "notext.jsonl"), "--output", str(ws / "d_h")],
         ("notext.jsonl:2",), outputs=lambda ws: [ws / "d_h.bin", ws / "d_h.idx"]),
    Case("data", "prepare-data: malformed JSON line",
         lambda ws: ["prepare-data", "--input", str(ws / "malformed.jsonl"), "--output", str(ws / "d_c")],
         ("malformed.jsonl:2", "invalid JSON"), outputs=lambda ws: [ws / "d_c.bin", ws / "d_c.idx"]),
    Case("data", "prepare-data: text key missing",
         lambda ws: ["prepare-data", "--input", str(ws / "nokey.jsonl"), "--output", str(ws / "d_d")],
         ("text",), outputs=lambda ws: [ws / "d_d.bin", ws / "d_d.idx"]),
    Case("data", "prepare-data: a line that is not an object",
         lambda ws: ["prepare-data", "--input", str(ws / "notobject.jsonl"), "--output", str(ws / "d_e")],
         ("notobject.jsonl:1", "JSON object"), outputs=lambda ws: [ws / "d_e.bin", ws / "d_e.idx"]),
    Case("data", "prepare-data: tokenizer directory missing",
         lambda ws: ["prepare-data", "--input", str(ws / "good.jsonl"), "--output", str(ws / "d_f"),
                     "--tokenizer", str(ws / "no_tokenizer")],
         ("no_tokenizer",), outputs=lambda ws: [ws / "d_f.bin", ws / "d_f.idx"]),
    Case("data", "train: indexed data prefix missing",
         lambda ws: ["train", *TINY, "data.source=indexed", f"data.paths=[{ws / 'no_data'}]",
                     f"logging.out_dir={ws / 'run_b'}"], ("no_data",), outputs=lambda ws: [ws / "run_b"]),
    # ---- budgets
    Case("budget", "slice: budget that is not a number",
         lambda ws: ["slice", "--checkpoint", _sorted(ws), "--budget", "half", "--out", str(ws / "fam_b")],
         ("'half' is not a budget",), outputs=lambda ws: [ws / "fam_b"]),
    Case("budget", "slice: budget above the parent",
         lambda ws: ["slice", "--checkpoint", _sorted(ws), "--budget", "2.0", "--out", str(ws / "fam_c")],
         ("2.0",), outputs=lambda ws: [ws / "fam_c"]),
    Case("budget", "slice: budget smaller than any subnet",
         lambda ws: ["slice", "--checkpoint", _sorted(ws), "--budget", "1K", "--out", str(ws / "fam_d")],
         ("1K",), outputs=lambda ws: [ws / "fam_d"]),
    Case("budget", "export-hf: negative budget",
         lambda ws: ["export-hf", "--checkpoint", _sorted(ws), "--budget", "-0.5", "--out", str(ws / "hf_c")],
         ("-0.5",), outputs=lambda ws: [ws / "hf_c"]),
    Case("budget", "export-hf: unknown dtype",
         lambda ws: ["export-hf", "--checkpoint", _sorted(ws), "--dtype", "int8", "--out", str(ws / "hf_d")],
         ("int8",), outputs=lambda ws: [ws / "hf_d"]),
    Case("budget", "export-hf: shard size that is not a size",
         lambda ws: ["export-hf", "--checkpoint", _sorted(ws), "--max-shard-size", "lots", "--out", str(ws / "hf_e")],
         ("--max-shard-size", "lots"), outputs=lambda ws: [ws / "hf_e"]),
    Case("budget", "generate: no prompt", lambda ws: ["generate", "--checkpoint", _sorted(ws)], ("--prompt",)),
    Case("budget", "generate: --max-new 0",
         lambda ws: ["generate", "--checkpoint", _sorted(ws), "--prompt", "1+1=", "--max-new", "0"], ("--max-new",)),
    Case("budget", "plan: GPU memory that is not a size", lambda ws: ["plan", "--gpu-memory", "lots"], ("lots",)),
    Case("budget", "plan: zero nodes", lambda ws: ["plan", "--nodes", "0"], ("--nodes",)),
    # ---- Hugging Face directories
    Case("hf", "import-hf: directory missing",
         lambda ws: ["import-hf", str(ws / "hf_nowhere"), "--out", str(ws / "imp_hf_a")], ("hf_nowhere",),
         outputs=lambda ws: [ws / "imp_hf_a"]),
    Case("hf", "import-hf: no config.json",
         lambda ws: ["import-hf", str(ws / "hf_empty"), "--out", str(ws / "imp_hf_b")], ("config.json",),
         outputs=lambda ws: [ws / "imp_hf_b"]),
    Case("hf", "import-hf: config.json is not JSON",
         lambda ws: ["import-hf", str(ws / "hf_badjson"), "--out", str(ws / "imp_hf_c")], ("not valid JSON",),
         outputs=lambda ws: [ws / "imp_hf_c"]),
    Case("hf", "import-hf: MoE layers (unsupported)",
         lambda ws: ["import-hf", str(ws / "hf_moe"), "--out", str(ws / "imp_hf_d")], ("MoE",),
         outputs=lambda ws: [ws / "imp_hf_d"]),
    Case("hf", "import-hf: no weight files",
         lambda ws: ["import-hf", str(ws / "hf_noweights"), "--out", str(ws / "imp_hf_e"), "model.backend=local"],
         ("safetensors",), outputs=lambda ws: [ws / "imp_hf_e"]),
    Case("hf", "import-hf: truncated safetensors",
         lambda ws: ["import-hf", str(ws / "hf_truncated"), "--out", str(ws / "imp_hf_f"), "model.backend=local"],
         ("model.safetensors",), outputs=lambda ws: [ws / "imp_hf_f"]),
    # ---- serving: the address is taken before the slow load, so these fail in about a second
    Case("serve", "serve: port already in use",
         lambda ws: ["serve", "--checkpoint", _sorted(ws), "--port", _busy_port()], ("--port", "in use")),
    Case("serve", "serve: port out of range",
         lambda ws: ["serve", "--checkpoint", _sorted(ws), "--port", "70000"], ("--port 70000",)),
]

MEASURED: list[tuple[Case, str, int]] = []


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}-{c.what}" for c in CASES])
def test_bad_input_is_one_line(ws, case, capfd):
    from elastic_megatron.cli import main

    argv = case.argv(ws)
    before = _tree(ws)
    capfd.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capfd.readouterr()
    lines = stderr_lines(err)
    assert rc == case.rc, (rc, out[-2000:], err[-4000:])
    assert len(lines) == 1, err[-4000:]
    assert lines[0].startswith("elastic-megatron: error: "), lines[0]
    for w in case.words:
        assert w in lines[0], (w, lines[0])
    for p in case.outputs(ws):
        assert not p.exists(), f"{p} left behind"
    assert _tree(ws) == before, f"left on disk: {sorted(_tree(ws) - before)}"
    MEASURED.append((case, lines[0], rc))


def _em(*args: str) -> list[str]:
    beside = Path(sys.executable).with_name("elastic-megatron")
    return [str(beside) if beside.exists() else "elastic-megatron", *args]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_train_is_one_line(tmp_path, signum):
    """A signal mid-run: one line, exit 128 + signal; SIGTERM first checkpoints the finished step."""
    out = tmp_path / "run"
    # without the rendezvous variables this process's in-process runs left behind (their port is still bound)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.Popen(_em("train", *TINY, "train.steps=500", f"logging.out_dir={out}"), env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.1)
    p.send_signal(signum)
    _, err = p.communicate(timeout=120)
    lines = stderr_lines(err)
    assert p.returncode == 128 + signum, (p.returncode, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("elastic-megatron: "), err[-3000:]
    assert signal.Signals(signum).name in lines[0]
    if signum == signal.SIGTERM:
        k = int(re.search(r"after step (\d+)", lines[0])[1])
        assert (out / "checkpoints" / f"iter_{k:07d}" / "metadata.json").exists()
    assert not list((out / "checkpoints").glob("*.tmp")) if (out / "checkpoints").exists() else True
    what = {signal.SIGTERM: "SIGTERM mid-train (scancel, preemption)", signal.SIGINT: "Ctrl-C mid-train"}[signum]
    MEASURED.append((Case("signal", what, lambda ws: []), lines[0], p.returncode))


def _normalize(text: str, ws: Path | None) -> str:
    text = text.replace(str(REPO), "<repo>")
    text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s']+?\d*/", "<tmp>/", text)
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", text)  # a port the OS picked
    return text.replace("|", "\\|")


def test_write_the_table_into_results(ws):
    """docs/results.md's bad-input table is regenerated from the cases measured above."""
    assert len(MEASURED) >= 30, f"only {len(MEASURED)} cases measured (run the whole file)"
    order = {g: i for i, g in enumerate(["config", "checkpoint", "data", "budget", "hf", "serve", "signal"])}
    rows = sorted(MEASURED, key=lambda m: order[m[0].group])
    body = ["| # | input | case | message (one line on stderr) | exit |", "|---|---|---|---|---|"]
    for i, (case, line, rc) in enumerate(rows, 1):
        body.append(f"| {i} | {case.group} | {case.what} | `{_normalize(line, ws)}` | {rc} |")
    table = "\n".join([BEGIN, *body, END])
    text = RESULTS.read_text()
    assert BEGIN in text and END in text, f"{RESULTS} lost its {BEGIN} ... {END} markers"
    new = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    if new != text:
        RESULTS.write_text(new)
