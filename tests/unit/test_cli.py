"""Every subcommand through the installed `elastic-megatron` console script, as a user types it.

For each: the happy path (exit 0, the files its output names exist and hold what it says, its last
line). Bad inputs (exit 2, one line, nothing left on disk) are tests/unit/test_bad_inputs.py's
table; here one of them goes through the console script, to show what a user sees. The happy paths chain like the README's pipeline: train -> importance -> elastic-train ->
slice; prepare-data and demo stand alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, stderr_lines

PARENT = [*FAST, "data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4"]
ONE_STAGE = ["curriculum=[{name: short, steps: 2}]"]


def console_script() -> str:
    """The `elastic-megatron` that `pip install -e .` put beside this interpreter (else on PATH)."""
    beside = Path(sys.executable).with_name("elastic-megatron")
    found = str(beside) if beside.exists() else shutil.which("elastic-megatron")
    assert found, "the elastic-megatron console script is not installed (run `make install`)"
    return found


def em(*args: str, cwd: Path = REPO, timeout: int = 600, threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run([console_script(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> list[str]:
    """The stdout lines of a run that must have succeeded."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout.strip().splitlines()


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """A run that must have failed on bad input: exit 2, one line on stderr with `words`, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = stderr_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("elastic-megatron: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def printed_path(lines: list[str], label: str) -> Path:
    line = next(x for x in lines if x.startswith(label))
    return Path(line[len(label):].strip())


def printed_checkpoint_and_steps(lines: list[str], out: Path, step: int) -> list[int]:
    """The printed checkpoint is out's newest, complete; returns the steps the printed metrics hold."""
    ckpt = printed_path(lines, "checkpoint:")
    assert ckpt == out / "checkpoints" / f"iter_{step:07d}" and (ckpt / "metadata.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert lines[-1].startswith("metrics:")
    return [json.loads(x)["step"] for x in printed_path(lines, "metrics:").read_text().splitlines() if '"loss"' in x]


# ----------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def trained(root) -> tuple[subprocess.CompletedProcess, Path]:
    out = root / "parent"
    return em("train", *PARENT, "train.steps=2", f"logging.out_dir={out}"), out


@pytest.fixture(scope="module")
def scored(root, trained) -> tuple[subprocess.CompletedProcess, Path]:
    ok(trained[0])
    out = root / "imp"
    return em("importance", *PARENT, "elastic.importance_batches=2", f"checkpoint.load={trained[1]}",
              f"logging.out_dir={out}"), out


@pytest.fixture(scope="module")
def sorted_args(scored) -> list[str]:
    ok(scored[0])
    return ["--config", str(scored[1] / "sorted" / "config.yaml"),
            f"checkpoint.load={scored[1] / 'sorted' / 'checkpoints'}"]


@pytest.fixture(scope="module")
def elastic(root, sorted_args) -> tuple[subprocess.CompletedProcess, Path]:
    out = root / "elastic"
    return em("elastic-train", *sorted_args, *FAST, *ONE_STAGE, f"logging.out_dir={out}"), out


def test_train(trained):
    proc, out = trained
    lines = ok(proc)
    assert re.fullmatch(r"trained 2 steps \([\d,]+ parameters\); final loss \d+\.\d{4}", lines[0]), lines
    assert printed_checkpoint_and_steps(lines, out, 2) == [1, 2]
    # megatron's CPU-only warnings are quiet without --verbose; the backend ladder says its choice once
    assert proc.stderr.strip().splitlines() == [
        "elastic-megatron: backend torch (megatron local layers, pure-PyTorch Mamba scan); passed over "
        "te: no CUDA device; triton: no CUDA device (mamba-ssm's Triton kernels run on GPUs only)"]


def test_train_bad_config_key(tmp_path):
    out = tmp_path / "never"
    one_line_error(em("train", "train.stepz=3", f"logging.out_dir={out}"), "config key 'train.stepz'", "unknown key")
    assert not out.exists()


def test_truncated_checkpoint_is_one_line_through_the_console_script(trained, tmp_path):
    """What a user sees after a half-written copy: one line, not torch's 70-line CheckpointException
    (the 49-case table runs in-process; this one goes through the process a user starts)."""
    ok(trained[0])
    broken = tmp_path / "broken"
    shutil.copytree(trained[1], broken)
    shard = sorted(broken.rglob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 10])
    out = tmp_path / "imp"
    one_line_error(em("importance", *PARENT, f"checkpoint.load={broken}", f"logging.out_dir={out}"),
                   "cannot be read", "incomplete or corrupted save")
    assert not out.exists()


def test_verbose_shows_megatron_warnings(tmp_path):
    proc = em("--verbose", "train", *PARENT, "train.steps=1", f"logging.out_dir={tmp_path}")
    ok(proc)
    assert "Transformer Engine and Apex are not installed" in proc.stderr


def test_importance(scored):
    proc, out = scored
    lines = ok(proc)
    assert printed_path(lines, "importance scores:") == out / "importance.pt" and (out / "importance.pt").exists()
    order = json.loads(lines[1].split(":", 1)[1])
    assert sorted(order) == list(range(10))  # the tiny pattern's ten layers, most important first
    m = re.fullmatch(r"sorted parent: (\S+) \(config (\S+)\)", lines[-1])
    assert m, lines[-1]
    assert (Path(m.group(1)) / "metadata.json").exists()
    cfg_text = Path(m.group(2)).read_text()
    assert "sort_tensor_parallel: 1" in cfg_text and str(out / "importance.pt") in cfg_text


def test_elastic_train(elastic):
    proc, out = elastic
    lines = ok(proc)
    assert re.fullmatch(r"elastic training done: final loss \d+\.\d{4}", lines[0]), lines
    assert printed_checkpoint_and_steps(lines, out, 2) == [1, 2]


def test_slice(elastic, tmp_path):
    from elastic_megatron.config import load_config

    ok(elastic[0])
    # the elastic run directory alone: its checkpoint records config, budgets, router and layer order
    lines = ok(em("slice", "--checkpoint", str(elastic[1]), "--out", str(tmp_path / "family")))
    assert len(lines) == 3  # one per budget of elastic.budgets: 1.0, 0.75, 0.5
    params = []
    for line, budget in zip(lines, ("1.0", "0.75", "0.5")):
        m = re.fullmatch(rf"\s*{re.escape(budget)}\s+target\s+([\d,]+)\s+params\s+([\d,]+)\s+pattern (\S+)\s+-> (\S+)",
                         line)
        assert m, line
        path = Path(m.group(4))
        assert (path / "checkpoints" / "latest").exists()
        assert load_config(str(path / "config.yaml")).model.hybrid_override_pattern == m.group(3)  # loadable
        assert json.loads((path / "subnet.json").read_text())["params"] == int(m.group(2).replace(",", ""))
        params.append(int(m.group(2).replace(",", "")))
    assert params[0] > params[1] > params[2]
    assert len(json.loads((tmp_path / "family" / "slices.json").read_text())) == 3


# ----------------------------------------------------------------------------- prepare-data

def _jsonl(path: Path, n: int) -> Path:
    from elastic_megatron.data.prepare import write_synthetic_jsonl

    return Path(write_synthetic_jsonl(str(path), n, seed=5))


def _hf_tokenizer_dir(path: Path, corpus: Path) -> Path:
    """A small byte-level BPE tokenizer trained here on the corpus and saved in Hugging Face's format
    (what a user passes as --tokenizer for a real parent; no hub access needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [json.loads(x)["text"] for x in corpus.read_text().splitlines()]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(path))
    return path


@pytest.mark.parametrize("tokenizer", ["char", "hf"])
def test_prepare_data(tmp_path, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = _jsonl(tmp_path / "docs.jsonl", 300)
    spec = "char" if tokenizer == "char" else str(_hf_tokenizer_dir(tmp_path / "tok", src))
    prefix = tmp_path / "data" / "docs"
    lines = ok(em("prepare-data", "--input", str(src), "--output", str(prefix), "--tokenizer", spec))
    m = re.fullmatch(r"wrote 300 documents, ([\d,]+) tokens \((\w+), vocab ([\d,]+)\) to (\S+) and (\S+)", lines[-1])
    assert m, lines[-1]
    assert (m.group(4), m.group(5)) == (f"{prefix}.bin", f"{prefix}.idx")
    ds = IndexedDataset(str(prefix))
    assert len(ds) == 300 and int(ds.sequence_lengths.sum()) == int(m.group(1).replace(",", ""))
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["docs.bin", "docs.idx"]  # no temporary left


# ----------------------------------------------------------------------------- demo

TOY = ["train.steps=4", "curriculum.0.steps=2", "curriculum.1.steps=2", "curriculum.1.global_batch_size=4",
       "curriculum.1.micro_batch_size=2", "curriculum.2.steps=2", "curriculum.2.seq_length=192",
       "curriculum.2.global_batch_size=4", "curriculum.2.micro_batch_size=2", "logging.progress=false",
       "logging.wandb_mode=disabled"]


def test_demo_writes_a_nested_evaluated_family(tmp_path):
    """The main job end to end at toy size: every stage runs and the report has what the README promises."""
    from elastic_megatron.elastic.subnet import Subnet

    out = tmp_path / "demo"
    # two threads, as `make demo` gives it: the parent trains on 2 local gloo ranks of one thread each
    # --train-parent: the toy's parent overrides train it anyway; here the console script takes the flag
    lines = ok(em("demo", "--out", str(out), "--short-problems", "4", "--long-problems", "2", "--train-parent", *TOY,
                  threads=2))
    assert lines[-1] == f"report: {out}/report.md, {out}/report.json, {out}/quality_vs_params.png"
    for name in ("report.md", "report.json", "quality_vs_params.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["nested"] is True and [r["name"] for r in saved["budgets"]] == ["1.0", "0.75", "0.5"]
    subnets = [Subnet.from_dict(r["architecture"]) for r in saved["budgets"]]
    assert all(b.is_within(a) for a, b in zip(subnets, subnets[1:]))
    params = [r["params"] for r in saved["budgets"]]
    assert params[0] > params[1] >= params[2]
    for r in saved["budgets"] + [saved["parent_before_elastic"]]:
        assert r["heldout_loss"] > 0 and 0 <= r["accuracy_short"] <= 1 and 0 <= r["accuracy_long"] <= 1
    assert saved["total_s"] > 0 and set(saved["timings_s"]) == {"parent_s", "parent_eval_s", "importance_s",
                                                                "elastic_s", "slice_eval_s", "export_s", "serve_s"}
    assert 0 < saved["parent_median_step_s"] < saved["timings_s"]["parent_s"]  # the box's speed, from the metrics
    assert 0 < saved["elastic_median_step_s"] < saved["timings_s"]["elastic_s"]
    assert saved["parent"] == "trained"  # the toy overrides are not the shipped parent's recipe
    # the console script's demo ran with spinning OpenMP threads (unless this environment chose a policy)
    assert saved["cpu_threads"] == {"threads": 2, "wait_policy": os.environ.get("OMP_WAIT_POLICY", "ACTIVE"),
                                    "parent_ranks": 2}
    assert "2 local rank(s) for the parent's training" in (out / "report.md").read_text()
    assert any(x.startswith("[demo] 1/6 training the parent") and x.endswith("(on 2 local gloo ranks, 1 thread(s) "
                                                                           "each)") for x in lines), lines
    # the parent's length curriculum: short problems, then the 2-6-step mix at 256 tokens
    from elastic_megatron.config import load_config

    short, long = (load_config(str(out / d / "config.yaml")) for d in ("parent_short", "parent"))
    assert (short.data.seq_length, short.data.max_steps, short.train.steps) == (128, 3, 4)
    assert (long.data.seq_length, long.data.min_steps, long.data.max_steps, long.train.steps) == (256, 2, 6, 1)
    assert long.checkpoint.load.startswith(str(out / "parent_short" / "checkpoints"))
    # elastic: the router's stage, then the deployed family weighted to the smallest, then the long mix
    el = load_config(str(out / "elastic" / "config.yaml"))
    assert [(s.name, s.router, s.budget_probs) for s in el.curriculum] == [
        ("short", "learn", []), ("small", "frozen", [0.2, 0.2, 0.6]), ("long", "frozen", [0.5, 0.3, 0.2])]
    stages = [json.loads(x).get("stage") for x in (out / "elastic" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in stages if s] == ["short"] * 2 + ["small"] * 2 + ["long"] * 2
    assert saved["parent_before_elastic"]["n_long"] == 2
    # the zero-shot homogeneous baseline of each smaller budget, in the report
    base = saved["homogeneous_baseline"]
    assert [r["name"] for r in base] == ["0.75", "0.5"] and all("accuracy_short_se" in r for r in base)
    assert [(r["n_short"], r["n_long"]) for r in base] == [(1, 1), (1, 1)]  # a quarter, rounded up, of 4 / 2
    assert abs(base[1]["params"] / params[2] - 1) < 0.05
    assert "baseline 0.5: homogeneous prune, no training" in (out / "report.md").read_text()
    sv = saved["serving"]  # one engine serving every budget: memory, decode speed, budget schedule
    assert sv["decode"]["memory"]["all_budgets_vs_parent"] < 1.05 and set(sv["decode"]["per_budget"]) == {"1.0", "0.75", "0.5"}
    assert len(sv["schedule"]["modes"]) == 3 and all(r["wall_s"] > 0 for r in sv["schedule"]["modes"].values())
    assert "One checkpoint serving every budget" in (out / "report.md").read_text()
    hf = saved["hf_export"]  # the family in HF format; the smallest answered through transformers
    assert [r["budget"] for r in hf["exported"]] == ["1.0", "0.75", "0.5"] and hf["budget"] == "0.5"
    for r, b in zip(hf["exported"], saved["budgets"]):
        assert (Path(r["path"]) / "config.json").exists() and r["params"] == b["params"]
    assert hf["same_as_ours"] is True and hf["prompt"] in (out / "report.md").read_text()


def test_demo_starts_from_the_shipped_parent(tmp_path):
    """The demo's own parent recipe (only the stages after the parent shortened) starts from the
    shipped parent: no parent training, and the parent evaluates as the trained one did."""
    from elastic_megatron import demo_parent

    out = tmp_path / "demo"
    after_parent = [o for o in TOY if not o.startswith("train.")] + ["elastic.deploy_candidates=1"]  # no search
    lines = ok(em("demo", "--out", str(out), "--short-problems", "4", "--long-problems", "2", *after_parent,
                  threads=2))
    assert any(x.startswith("[demo] 1/6 the parent: the shipped one") for x in lines), lines
    saved = json.loads((out / "report.json").read_text())
    assert saved["parent"] == "shipped" and saved["cpu_threads"]["parent_ranks"] == 0
    assert saved["parent_median_step_s"] == 0.0 and not (out / "parent_short").exists()
    assert saved["parent_before_elastic"]["heldout_loss"] == pytest.approx(  # another CPU may round the last bits
        demo_parent.shipped_recipe()["heldout_loss"], rel=1e-5)
    assert saved["nested"] is True and "the parent not trained here" in (out / "report.md").read_text()


def test_demo_refuses_a_parent_directory_of_another_run(tmp_path):
    """An --out left by another demo version (a short-only parent) is not silently reused or resumed."""
    from elastic_megatron.config import load_config, to_yaml

    out = tmp_path / "demo"
    (out / "parent").mkdir(parents=True)
    stale = load_config(None, ["train.steps=4", "data.max_steps=3"])  # short problems only: not the long phase
    (out / "parent" / "config.yaml").write_text(to_yaml(stale))
    r = em("demo", "--out", str(out), *TOY)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"elastic-megatron: error: {out / 'parent'} holds another run (its model, data, train or parallel config "
        "differs from this demo's): remove it or pick another --out"], r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["parent"]  # nothing trained, nothing written


# ----------------------------------------------------------------------------- plan

def test_plan_for_the_12b_preset():
    def rows(*overrides):
        lines = ok(em("plan", "--config", "nemotron_nano_12b_v2", "--gpu-memory", "80GB", "--nodes", "8", *overrides))
        assert lines[0].startswith("per-rank memory in GiB (GPU memory 80 GiB")
        tp8 = [x.split() for x in lines[2:-1] if x.split()[:4] == ["8", "1", "8", "elastic"]]
        return {r[4]: r for r in tp8 if r[6] == "yes"}, tp8, lines[-1]  # by stage ("elastic", "long": two words)

    # without the preset's per-stage recomputation, stage 2 (49,152 tokens) at TP 8 does not fit; with it,
    # it fits with the distributed optimizer
    _, tp8, _ = rows("curriculum.1.recompute=")
    fits = {(r[4], r[7]): r[-1] for r in tp8 if r[6] == "yes"}
    assert fits[("long", "none")] == "NO" and fits[("long", "full")] == "yes", tp8
    assert {r[8] for r in tp8 if r[4] == "long"} == {"hard"}  # the frozen stage runs the deployed subnets sliced
    assert {r[8] for r in tp8 if r[4] == "short"} == {"soft"}  # the router learns in soft mode
    # the preset: stage 2 always recomputes, stage 1 follows train.recompute and fits without it
    _, tp8, summary = rows()
    assert {r[7] for r in tp8 if r[4] == "long"} == {"full"}
    assert {(r[7], r[-1]) for r in tp8 if r[4] == "short" and r[6] == "yes"} == {("none", "yes"), ("full", "yes")}
    assert summary.startswith("fits every phase:") and summary.endswith("recompute none (stage long: full)"), summary
    # the preset runs sequence parallelism: a stage length TP 8 does not divide is refused in one line
    one_line_error(em("plan", "--config", "nemotron_nano_12b_v2", "parallel.tensor=8", "curriculum.1.seq_length=49150"),
                   "curriculum.1.seq_length", "multiple of parallel.tensor (8)")


def test_planner_model_state_terms_are_exact():
    from elastic_megatron.model.hybrid import count_parameters
    from elastic_megatron.plan import Phase, rank_memory

    cfg = load_config_for("nemotron_nano_12b_v2")
    ph = Phase("p", 8192, 1, 1536, False)
    one = rank_memory(cfg, 131072, 1, 1, 1, ph, "none", False, 2)
    assert one["weights"] == 2 * count_parameters(cfg.model, 131072)  # bf16, one rank holds everything
    assert one["optimizer"] == 12 * count_parameters(cfg.model, 131072)
    sharded = rank_memory(cfg, 131072, 8, 1, 8, ph, "none", True, 2)
    assert sharded["optimizer"] == sharded["main_grads"] * 3 / 8  # 12 B/param over DP 8 vs 4 B/param


def test_planner_backward_term_grows_with_sequence_and_is_larger_for_the_cpu_scan():
    from elastic_megatron.plan import Phase, rank_memory

    cfg = load_config_for(None)  # the tiny model, vocab 64: the layers' working set, not the loss's, is the largest

    def backward(seq: int, kernels: str, recompute: str) -> float:
        ph = Phase("e", seq, 2, 2, True)
        return rank_memory(cfg, 64, 1, 1, 1, ph, recompute, False, 2, kernels=kernels)["backward"]

    for recompute in ("none", "full"):
        for kernels in ("fused", "torch"):
            assert 0 < 2 * backward(256, kernels, recompute) < backward(1024, kernels, recompute)
        # the pure-PyTorch scan's fp32 chunk intermediates for every head vs mamba-ssm's state-sized workspace
        assert backward(1024, "torch", recompute) > 1.5 * backward(1024, "fused", recompute)


def test_planner_activations_are_what_autograd_saves_on_cpu():
    """The planner's activation term for the CPU kernels ("torch") is what autograd keeps in the elastic
    forward in bf16, within 1%: at full size (hard) and under the router's soft masks (a budget while
    the router learns in soft mode), with and without recomputation, for the tiny model and for an
    MLP / attention stack where soft masks cost more than the hard plan would say
    (benchmarks/plan_check.py checks the step's peak with the teacher and the loss as well)."""
    import os

    import torch

    from elastic_megatron.elastic.model import ElasticHybrid, SoftMasks
    from elastic_megatron.elastic.router import build_router
    from elastic_megatron.model.hybrid import build_model
    from elastic_megatron.parallel import ParallelLayout, destroy_distributed, init_distributed
    from elastic_megatron.plan import Phase, rank_memory

    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 90))
    layout = ParallelLayout.resolve(load_config_for(None), 1)
    init_distributed(layout, 0)
    try:
        for pattern in ("M-M*-M-M*-", "-*--"):
            cfg = load_config_for(None, [f"model.hybrid_override_pattern={pattern}"])
            model = build_model(cfg, layout, 64, torch.bfloat16)
            router = build_router(cfg, 64)
            masks = SoftMasks.of(router.soft_masks(router(1, step=0, total_steps=2, seed=1)))
            gates = torch.ones(cfg.model.num_layers, requires_grad=True)  # the router's straight-through gates
            b, s = 2, 128
            tokens = torch.randint(0, 64, (b, s), generator=torch.Generator().manual_seed(0))
            params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *router.parameters(), gates]}
            measured, planned = {}, {}
            for soft in (False, True):
                for recompute in ("none", "full"):
                    cfg.train.recompute = recompute
                    seen: dict[int, int] = {}

                    def pack(t):
                        st = t.untyped_storage()
                        if st.data_ptr() not in params:
                            seen[st.data_ptr()] = st.nbytes()
                        return t

                    kw = {"masks": masks, "gates": gates} if soft else {}
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        logits = ElasticHybrid(model, cfg, layout)(tokens, torch.arange(s).expand(b, s), **kw)
                    ph = Phase("p", s, b, b, soft, soft=soft)
                    key = soft, recompute
                    # a forward without labels: the KD loss's tensors are the `logits` term, not activations
                    planned[key] = rank_memory(cfg, 64, 1, 1, 1, ph, recompute, False, 2, kernels="torch")["activations"]
                    measured[key] = sum(seen.values())
                    assert abs(planned[key] / measured[key] - 1) < 0.01, (pattern, key, planned[key], seen)
                    del logits
            if pattern == "-*--":  # a plan that ignored soft masks would miss here
                assert measured[True, "none"] > 1.03 * measured[False, "none"], measured
    finally:
        destroy_distributed()


def test_planner_sequence_parallel_splits_the_replicated_activations():
    """Under sequence parallelism the tensors outside the projections hold 1/TP of the sequence: with
    recomputation (each layer keeps only its input) the activations and the p2p buffers are ~1/TP;
    the model state is unchanged (benchmarks/plan_check.py --tp 2 measures it on gloo ranks)."""
    from elastic_megatron.plan import phases, rank_memory

    cfg = load_config_for("nemotron_nano_12b_v2")
    long = phases(cfg)[-1]
    plain = rank_memory(cfg, 131072, 8, 2, 4, long, "full", True, 2)
    sp = rank_memory(cfg, 131072, 8, 2, 4, long, "full", True, 2, sequence_parallel=True)
    # 1/8, but for the final norm's output, gathered whole for the output layer
    assert plain["activations"] / 8 < sp["activations"] < plain["activations"] / 6 and sp["p2p"] == plain["p2p"] / 8
    assert {k: sp[k] for k in ("weights", "main_grads", "optimizer", "teacher", "logits")} == \
        {k: plain[k] for k in ("weights", "main_grads", "optimizer", "teacher", "logits")}
    # without recomputation the mixers' whole-sequence tensors stay: less saved, not 1/TP
    plain, sp = (rank_memory(cfg, 131072, 8, 1, 8, phases(cfg)[0], "none", True, 2, sequence_parallel=x)
                 for x in (False, True))
    assert plain["activations"] / 8 < sp["activations"] < plain["activations"]
    # TP 1: nothing to split
    assert rank_memory(cfg, 131072, 1, 1, 8, long, "full", True, 2, sequence_parallel=True) == \
        rank_memory(cfg, 131072, 1, 1, 8, long, "full", True, 2)


def test_planner_plans_the_router_learning_stage_in_soft_mode():
    """Stage 1 of the default recipe (router: learn, elastic.mode=soft) is planned with soft masks and
    needs more than the hard plan; the frozen stage 2, parent training and elastic.mode=hard do not."""
    from dataclasses import replace

    from elastic_megatron.plan import phases, rank_memory

    cfg = load_config_for("nemotron_nano_12b_v2")
    ph = {p.name: p for p in phases(cfg)}
    assert [p.soft for p in ph.values()] == [False, True, False]  # parent, short (learn), long (frozen)
    short = ph["elastic short"]
    soft = rank_memory(cfg, 131072, 8, 1, 8, short, "none", True, 2)
    hard = rank_memory(cfg, 131072, 8, 1, 8, replace(short, soft=False), "none", True, 2)
    assert soft["activations"] > 1.2 * hard["activations"]
    assert {k: soft[k] for k in ("weights", "optimizer", "teacher")} == {k: hard[k] for k in ("weights", "optimizer", "teacher")}
    hard_cfg = replace(cfg, elastic=replace(cfg.elastic, mode="hard"))
    assert not any(p.soft for p in phases(hard_cfg))


def load_config_for(preset: str, overrides: tuple = ()):
    from elastic_megatron.config import load_config

    return load_config(preset, list(overrides))


# ----------------------------------------------------------------------------- Hugging Face in and out

def test_import_export_generate_through_the_console_script(tmp_path):
    """import-hf -> export-hf -> generate (on the export and on the imported checkpoint) as a user types them."""
    pytest.importorskip("transformers")
    from tests.unit.test_hf import make_hf_parent

    make_hf_parent(tmp_path / "src")
    lines = ok(em("import-hf", str(tmp_path / "src"), "--out", str(tmp_path / "run"), "logging.wandb_mode=disabled"))
    assert lines[0].startswith("imported ") and "pattern M-*-M-" in lines[0]
    assert printed_path(lines, "parent checkpoint:").is_dir()
    lines = ok(em("export-hf", "--checkpoint", str(tmp_path / "run"), "--budget", "1.0", "--out", str(tmp_path / "exp")))
    assert lines[-1].endswith(str(tmp_path / "exp" / "budget_1p0")) and "stock transformers" in lines[-1]
    prompt = "q: 2+3 ="
    hf = em("generate", "--checkpoint", str(tmp_path / "exp" / "budget_1p0"), "--prompt", prompt, "--max-new", "6")
    # the same continuation as our own decoder on the imported checkpoint (test_hf.py: cut at load, in-process)
    from elastic_megatron.formats.hf_jobs import resolve_export_config
    from elastic_megatron.generate import generate_elastic

    cfg = resolve_export_config(None, str(tmp_path / "run"), ["model.backend=local"])
    assert ok(hf)[-1] == prompt + generate_elastic(cfg, "1.0", [prompt], max_new=6)[0]
    assert "falling back" not in hf.stderr  # transformers' CPU-only notes hidden


_POLICY_PROBE = """
import json, os, sys
from elastic_megatron import cli
seen = {}
def probe(command, _orig=cli._demo_thread_policy):
    _orig(command)
    seen.update(command=command, torch_loaded="torch" in sys.modules, policy=os.environ.get("OMP_WAIT_POLICY"))
cli._demo_thread_policy = probe
code = cli.main(sys.argv[1:])
print(json.dumps({**seen, "exit": code}))
"""


@pytest.mark.parametrize("argv, preset, policy", [
    (["demo", "--out", "OUT", "no_such.key=1"], None, "ACTIVE"),  # the demo: threads spin
    (["demo", "--out", "OUT", "no_such.key=1"], "PASSIVE", "PASSIVE"),  # the user's choice wins
    (["train", "no_such.key=1"], None, None),  # other jobs keep libgomp's default
])
def test_demo_thread_policy_is_set_before_torch_loads(tmp_path, argv, preset, policy):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: the CLI must set it before any
    import of torch, for the demo only, and never over the user's own value."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    argv = [a.replace("OUT", str(tmp_path / "demo")) for a in argv]
    done = subprocess.run([sys.executable, "-c", _POLICY_PROBE, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"command": argv[0], "torch_loaded": False, "policy": policy, "exit": 2}, done.stderr[-2000:]
