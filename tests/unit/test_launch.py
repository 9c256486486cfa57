"""Launch scripts: launch/torchrun.sh, slurm/job.sbatch (+ train.sbatch), slurm/pipeline.sh, Dockerfile.

The shell scripts run for real, with `torchrun`, `srun` and `scontrol` replaced by stubs on PATH
that record their argv (one argument per line), so every test checks the exact command line that
would run. No torch import, no network; the whole file takes about a second. The real SLURM test
(the pipeline under slurmctld + slurmd, preempted and requeued) is tests/slurm/test_real_slurm.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "slurm" / "job.sbatch"
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
PIPELINE = ROOT / "slurm" / "pipeline.sh"
BASH = shutil.which("bash") or "/bin/bash"

# A stub records its argv in $STUB_DIR/<name>.args (one arg per line) plus its cwd and a few
# env vars; its exit code is $STUB_RC_<name> (default 0). `srun` can wait for $STUB_DIR/stop.
STUB = r"""#!/usr/bin/env bash
name=$(basename "$0")
printf '%s\n' "$@" > "$STUB_DIR/$name.args"
{ echo "PWD=$PWD"; echo "PID=$$"; echo "OMP_NUM_THREADS=${OMP_NUM_THREADS-<unset>}"; } > "$STUB_DIR/$name.env"
if [[ "$name" == scontrol && "$1 $2" == "show hostnames" ]]; then printf 'gpu-node07\ngpu-node08\n'; fi
if [[ "$name" == scontrol && "$1" == requeue ]]; then printf '%s\n' "$@" > "$STUB_DIR/requeue.args"; fi
if [[ "$name" == srun && -n "${STUB_SRUN_WAIT:-}" ]]; then
    touch "$STUB_DIR/srun.started"
    for _ in $(seq 1 100); do [[ -e "$STUB_DIR/stop" ]] && break; sleep 0.05; done
fi
rc_var="STUB_RC_${name//[^A-Za-z0-9_]/_}"; exit "${!rc_var:-0}"
"""


@pytest.fixture
def stubs(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("torchrun", "srun", "scontrol"):
        (d / name).write_text(STUB)
        (d / name).chmod(0o755)
    return d


def base_env(stub_dir: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no SLURM_*, MASTER_*, OMP_* or CONFIG from the caller's shell."""
    env = {"PATH": f"{stub_dir}:/usr/bin:/bin", "HOME": str(stub_dir.parent), "STUB_DIR": str(stub_dir),
           "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def recorded(stub_dir: Path, name: str) -> list[str] | None:
    f = stub_dir / f"{name}.args"
    return f.read_text().splitlines() if f.exists() else None


def stub_env(stub_dir: Path, name: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (stub_dir / f"{name}.env").read_text().splitlines())


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=20)


# --------------------------------------------------------------------------- syntax


@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH, TRAIN_SBATCH, PIPELINE], ids=lambda p: p.name)
def test_script_parses_with_bash_n(script):
    assert script.exists(), f"{script} is missing"
    r = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert text.startswith("#!"), "needs a shebang line"
    assert "set -euo pipefail" in text


def test_torchrun_sh_is_executable():
    assert os.access(TORCHRUN_SH, os.X_OK), "launch/torchrun.sh must be chmod +x (it is run directly)"


# --------------------------------------------------------------------------- launch/torchrun.sh


def test_torchrun_help(stubs):
    r = run([str(TORCHRUN_SH), "-h"], base_env(stubs))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: launch/torchrun.sh")
    for opt in ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--dry-run"):
        assert opt in r.stdout
    assert recorded(stubs, "torchrun") is None


def test_torchrun_dry_run_single_node(stubs):
    r = run([str(TORCHRUN_SH), "--dry-run", "--nproc", "2", "--", "train", "parallel.tensor=2"], base_env(stubs))
    assert r.returncode == 0, r.stderr
    assert "--standalone --nproc_per_node=2 -m elastic_megatron.cli train parallel.tensor=2" in r.stdout
    assert "--nnodes" not in r.stdout and "--master_addr" not in r.stdout
    assert r.stdout.startswith("OMP_NUM_THREADS=1 torchrun "), r.stdout  # default: 1 thread per rank
    assert recorded(stubs, "torchrun") is None, "--dry-run must not start torchrun"


def test_torchrun_dry_run_multi_node(stubs):
    r = run([str(TORCHRUN_SH), "--dry-run", "--nproc", "8", "--nnodes", "2", "--node-rank", "1",
             "--master-addr", "10.1.2.3", "--master-port", "6000", "--", "train", "--config", "tiny"],
            base_env(stubs))
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.strip())
    assert argv[:2] == ["OMP_NUM_THREADS=1", "torchrun"]
    assert "--standalone" not in argv
    assert argv[2:] == ["--nnodes=2", "--node_rank=1", "--master_addr=10.1.2.3", "--master_port=6000",
                        "--nproc_per_node=8", "-m", "elastic_megatron.cli", "train", "--config", "tiny"]
    assert recorded(stubs, "torchrun") is None


def test_torchrun_runs_exactly_the_printed_command(stubs):
    """Without --dry-run the printed line is what gets exec'd, quoting included."""
    args = ["train", "parallel.tensor=2", "logging.wandb_run_name=two words", "train.lr=3e-4"]
    r = run([str(TORCHRUN_SH), "--nproc=3", "--", *args], base_env(stubs, STUB_RC_torchrun="7"))
    assert r.returncode == 7, "the wrapper must exec torchrun and pass its exit code on"
    printed = shlex.split(r.stdout.strip().splitlines()[-1])
    ran = recorded(stubs, "torchrun")
    assert ran is not None, "torchrun was not started"
    assert printed[1] == "torchrun" and printed[2:] == ran
    assert ran == ["--standalone", "--nproc_per_node=3", "-m", "elastic_megatron.cli", *args]
    assert stub_env(stubs, "torchrun")["OMP_NUM_THREADS"] == "1"


def test_torchrun_execs_so_signals_reach_torchrun(stubs):
    """torchrun replaces the wrapper process: SIGTERM from a scheduler goes straight to it."""
    p = subprocess.Popen([str(TORCHRUN_SH), "--nproc", "1", "--", "train"], env=base_env(stubs), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.communicate(timeout=20)
    assert p.returncode == 0
    assert stub_env(stubs, "torchrun")["PID"] == str(p.pid)


def test_torchrun_keeps_callers_omp_threads_and_torchrun(stubs, tmp_path):
    other = tmp_path / "venv-bin"
    other.mkdir()
    shutil.copy(stubs / "torchrun", other / "my-torchrun")
    r = run([str(TORCHRUN_SH), "--nproc", "1", "--", "train"],
            base_env(stubs, OMP_NUM_THREADS="6", TORCHRUN=str(other / "my-torchrun")))
    assert r.returncode == 0, r.stderr
    assert stub_env(stubs, "my-torchrun")["OMP_NUM_THREADS"] == "6"
    assert recorded(stubs, "my-torchrun") == ["--standalone", "--nproc_per_node=1", "-m", "elastic_megatron.cli",
                                              "train"]
    assert recorded(stubs, "torchrun") is None


@pytest.mark.parametrize("gpus, visible, expect", [
    (0, None, 1),     # no nvidia-smi: one CPU rank
    (4, None, 4),     # one rank per GPU
    (4, "1,3", 2),    # ... per visible GPU
    (4, "", 1),       # CUDA_VISIBLE_DEVICES="" hides them all
])
def test_torchrun_default_nproc(stubs, gpus, visible, expect):
    if gpus:
        smi = stubs / "nvidia-smi"
        smi.write_text("#!/usr/bin/env bash\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n"
                                                         for i in range(gpus)))
        smi.chmod(0o755)
    env = base_env(stubs) if visible is None else base_env(stubs, CUDA_VISIBLE_DEVICES=visible)
    r = run([str(TORCHRUN_SH), "--dry-run", "--", "train"], env)
    assert r.returncode == 0, r.stderr
    assert f" --nproc_per_node={expect} " in r.stdout


@pytest.mark.parametrize("args, message", [
    ([], "no elastic-megatron arguments"),
    (["--"], "no elastic-megatron arguments"),
    (["--bogus", "--", "train"], "unknown option '--bogus'"),
    (["--nproc", "0", "--", "train"], "--nproc must be a positive integer"),
    (["--nproc", "two", "--", "train"], "--nproc must be a positive integer"),
    (["--nproc"], "--nproc needs a value"),
    (["--nnodes", "2", "--node-rank", "1", "--", "train"], "needs --master-addr"),
    (["--nnodes", "2", "--master-addr", "h0", "--", "train"], "needs --node-rank"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h0", "--", "train"], "--node-rank must be in 0..1"),
])
def test_torchrun_rejects_bad_usage(stubs, args, message):
    r = run([str(TORCHRUN_SH), *args], base_env(stubs))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert recorded(stubs, "torchrun") is None


# --------------------------------------------------------------------------- slurm/job.sbatch


def slurm_env(stubs: Path, submit_dir: Path, **extra: str) -> dict[str, str]:
    slurm = {"SLURM_JOB_NODELIST": "gpu-node[07-08]", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242",
             "SLURM_SUBMIT_DIR": str(submit_dir)}
    return base_env(stubs, **{**slurm, **extra})


def test_sbatch_builds_the_torchrun_command(stubs, tmp_path):
    submit = tmp_path / "submit"
    submit.mkdir()
    env = slurm_env(stubs, submit, CONFIG="configs/run.yaml", OUT_DIR="runs/job")
    r = run([BASH, str(SBATCH), "train", "train.steps=3", "logging.wandb_run_name=a b"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert recorded(stubs, "scontrol") == ["show", "hostnames", "gpu-node[07-08]"]
    assert recorded(stubs, "srun") == [
        "--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        "torchrun", "--nnodes=1", "--nproc_per_node=8",  # GPUS_PER_NODE default: 8
        "--rdzv_id=4242", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-node07:29742",  # 29500 + 4242 % 1000
        "-m", "elastic_megatron.cli", "train", "--config", "configs/run.yaml",
        "logging.out_dir=runs/job", "train.steps=3", "logging.wandb_run_name=a b",
    ]
    srun_env = stub_env(stubs, "srun")
    assert srun_env["PWD"] == str(submit), "the job must run in SLURM_SUBMIT_DIR"
    assert srun_env["OMP_NUM_THREADS"] == "1"
    assert "gpu-node07:29742" in r.stdout  # the command is logged


@pytest.mark.parametrize("extra, expect_in, expect_out", [
    ({"SLURM_NNODES": "2", "MASTER_PORT": "6000"},
     ["--nodes=2", "--nnodes=2", "--rdzv_endpoint=gpu-node07:6000"], []),
    ({"SLURM_GPUS_ON_NODE": "4"}, ["--nproc_per_node=4"], ["--nproc_per_node=8"]),
    ({"SLURM_GPUS_ON_NODE": "4", "GPUS_PER_NODE": "2"}, ["--nproc_per_node=2"], ["--nproc_per_node=4"]),
    ({"SLURM_CPUS_PER_TASK": "16"}, ["--cpus-per-task=16"], []),
    ({"MASTER_ADDR": "localhost"}, ["--rdzv_endpoint=gpu-node07:29742"], []),  # never an inherited one
    ({}, [], ["--config"]),  # no CONFIG: the embedded tiny model, no --config flag
    ({"CONTAINER_IMAGE": "/img/em.sqsh", "CONTAINER_MOUNTS": "/data:/data"},
     ["--container-image=/img/em.sqsh", "--container-mounts={submit}:{submit},/data:/data",
      "--container-workdir={submit}"], []),
], ids=["two-nodes", "gpus-from-slurm", "gpus-per-node-wins", "cpus-per-task", "ignores-master-addr",
        "no-config", "container"])
def test_sbatch_settings(stubs, tmp_path, extra, expect_in, expect_out):
    env = slurm_env(stubs, tmp_path, **extra)
    r = run([BASH, str(SBATCH), "train"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = recorded(stubs, "srun")
    for item in expect_in:
        assert item.format(submit=tmp_path) in argv, (item, argv)
    for item in expect_out:
        assert not any(a.startswith(item) for a in argv), (item, argv)
    # srun's own options, then the torchrun executable
    assert all(a.startswith("--") for a in argv[:argv.index("torchrun")]), argv


def test_sbatch_passes_the_step_exit_code_on(stubs, tmp_path):
    r = run([BASH, str(SBATCH), "train"], slurm_env(stubs, tmp_path, STUB_RC_srun="3"), cwd=tmp_path)
    assert r.returncode == 3
    assert "step exited with 3" in r.stdout


def test_sbatch_refuses_to_run_outside_slurm(stubs, tmp_path):
    env = slurm_env(stubs, tmp_path)
    del env["SLURM_JOB_NODELIST"]
    r = run([BASH, str(SBATCH), "train"], env, cwd=tmp_path)
    assert r.returncode != 0
    assert "SLURM_JOB_NODELIST" in r.stderr
    assert recorded(stubs, "srun") is None


@pytest.mark.parametrize("requeue", ["0", "1"])
def test_sbatch_usr1_before_time_limit(stubs, tmp_path, requeue):
    """USR1 (--signal=B:USR1@N) reaches the batch shell while srun runs: with REQUEUE=1 the job is
    requeued; either way the script keeps waiting for the step and returns its exit code."""
    env = slurm_env(stubs, tmp_path, REQUEUE=requeue, STUB_SRUN_WAIT="1", STUB_RC_srun="5")
    p = subprocess.Popen([BASH, str(SBATCH), "train"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while not (stubs / "srun.started").exists():
            assert p.poll() is None and time.monotonic() < deadline, "srun stub never started"
            time.sleep(0.02)
        p.send_signal(signal.SIGUSR1)
        if requeue == "1":
            while not (stubs / "requeue.args").exists():
                assert time.monotonic() < deadline, "USR1 did not lead to 'scontrol requeue'"
                time.sleep(0.02)
        else:
            time.sleep(0.3)
        assert p.poll() is None, "the batch shell must keep waiting for the step after USR1"
        (stubs / "stop").touch()
        out, err = p.communicate(timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 5, (out, err)
    assert "time limit near (USR1)" in out
    if requeue == "1":
        assert (stubs / "requeue.args").read_text().split() == ["requeue", "4242"]
    else:
        assert not (stubs / "requeue.args").exists()


def sbatch_header(text: str) -> tuple[dict[str, str], int]:
    """#SBATCH options, and how many of them come after the first command (sbatch ignores those)."""
    opts, late, seen_command = {}, 0, False
    for line in text.splitlines()[1:]:
        s = line.strip()
        if s.startswith("#SBATCH"):
            key, _, value = s.split(None, 1)[1].partition("=")
            opts[key] = value
            late += seen_command
        elif s and not s.startswith("#"):
            seen_command = True
    return opts, late


def test_sbatch_header():
    opts, late = sbatch_header(SBATCH.read_text())
    assert late == 0, "#SBATCH lines after the first command are ignored by sbatch"
    assert opts["--ntasks-per-node"] == "1"
    for key in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--time", "--output", "--job-name"):
        assert opts.get(key), f"missing #SBATCH {key}"
    # The warning must go to the batch shell only (B:), never straight to torchrun.
    assert re.fullmatch(r"B:USR1@\d+", opts["--signal"]), opts["--signal"]
    assert int(opts["--signal"].split("@")[1]) > 60, "Slurm may send the signal up to 60 s early"
    assert opts.get("--open-mode") == "append", "a requeued job must not truncate its log"
    assert "--requeue" in opts


@pytest.mark.parametrize("job, args, env, tail", [
    ("importance", ["checkpoint.load=runs/a/parent"], {"CONFIG": "runs/a/parent/config.yaml", "OUT_DIR": "runs/a/imp"},
     ["importance", "--config", "runs/a/parent/config.yaml", "logging.out_dir=runs/a/imp", "checkpoint.load=runs/a/parent"]),
    ("elastic-train", ["--config", "s.yaml", "checkpoint.load=ck"], {},
     ["elastic-train", "--config", "s.yaml", "checkpoint.load=ck"]),
    ("slice", ["--checkpoint", "runs/a/elastic", "--out", "fam"], {"OUT_DIR": "ignored"},
     ["slice", "--checkpoint", "runs/a/elastic", "--out", "fam"]),
    ("export-hf", ["--checkpoint", "runs/a/elastic", "--out", "hf", "--budget", "0.5"], {"CONFIG": "ignored"},
     ["export-hf", "--checkpoint", "runs/a/elastic", "--out", "hf", "--budget", "0.5"]),
    ("import-hf", ["/models/nano", "--out", "runs/a/parent"], {},
     ["import-hf", "/models/nano", "--out", "runs/a/parent"]),
])
def test_job_sbatch_runs_every_job(stubs, tmp_path, job, args, env, tail):
    """The first argument selects the job; CONFIG / OUT_DIR apply to the config-taking training jobs only."""
    r = run([BASH, str(SBATCH), job, *args], slurm_env(stubs, tmp_path, **env), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = recorded(stubs, "srun")
    assert argv[argv.index("-m"):] == ["-m", "elastic_megatron.cli", *tail]
    assert f"({job})" in r.stdout


@pytest.mark.parametrize("first", ["", "trian", "train.steps=3"])
def test_job_sbatch_needs_a_job(stubs, tmp_path, first):
    r = run([BASH, str(SBATCH), *([first] if first else [])], slurm_env(stubs, tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "first argument must be the job" in r.stderr, (r.stdout, r.stderr)
    assert recorded(stubs, "srun") is None


def test_train_sbatch_is_job_sbatch_train(stubs, tmp_path):
    """train.sbatch (kept for existing submit scripts) = job.sbatch train, same header, same process."""
    env = slurm_env(stubs, tmp_path, REPO_DIR=str(ROOT), CONFIG="configs/run.yaml")
    r = run([BASH, str(TRAIN_SBATCH), "train.steps=3"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    argv = recorded(stubs, "srun")
    assert argv[argv.index("-m"):] == ["-m", "elastic_megatron.cli", "train", "--config", "configs/run.yaml",
                                        "train.steps=3"]
    assert sbatch_header(TRAIN_SBATCH.read_text()) == sbatch_header(SBATCH.read_text())
    assert re.search(r'^exec bash "\$REPO_DIR/slurm/job.sbatch" train "\$@"$', TRAIN_SBATCH.read_text(), re.M)


# --------------------------------------------------------------------------- slurm/pipeline.sh

# sbatch stub: records each call's argv (NUL-separated lines in sbatch.calls) and GPUS_PER_NODE,
# answers like --parsable with ids 101, 102, ...
SBATCH_STUB = r"""#!/usr/bin/env bash
n=$(( $(cat "$STUB_DIR/sbatch.n" 2>/dev/null || echo 100) + 1 )); echo $n > "$STUB_DIR/sbatch.n"
{ printf '%s\n' "GPUS_PER_NODE=${GPUS_PER_NODE-<unset>}" "$@"; printf '\0'; } >> "$STUB_DIR/sbatch.calls"
[[ -n "${STUB_SBATCH_FAIL_AT:-}" && "$n" == "$STUB_SBATCH_FAIL_AT" ]] && { echo "sbatch: error: denied" >&2; exit 1; }
echo "$n;localci"
"""


def sbatch_calls(stub_dir: Path) -> list[list[str]]:
    f = stub_dir / "sbatch.calls"
    return [c.strip("\n").split("\n") for c in f.read_text().split("\0") if c.strip()] if f.exists() else []


def _job(call: list[str]) -> tuple[str, list[str]]:
    """(the sbatch options before job.sbatch, the job's argv after it)."""
    i = call.index(str(SBATCH))
    return call[:i], call[i + 1:]


@pytest.fixture
def sbatch_stub(stubs):
    (stubs / "sbatch").write_text(SBATCH_STUB)
    (stubs / "sbatch").chmod(0o755)
    return stubs


def test_pipeline_chains_every_job_with_afterok(sbatch_stub, tmp_path):
    run_dir = tmp_path / "fam"
    r = run([str(PIPELINE), "--out", str(run_dir), "--config", "configs/tiny.yaml", "--budget", "0.5", "--slice",
             "--nodes", "2", "--gpus-per-node", "4", "--elastic-args", "parallel.tensor=2 train.lr=1e-4",
             "--train-args", "train.steps=9", "--sbatch-args", "--partition=batch --time=60", "logging.wandb_mode=offline"],
            base_env(sbatch_stub))
    assert r.returncode == 0, r.stderr
    calls = sbatch_calls(sbatch_stub)
    assert len(calls) == 5
    (o1, train), (o2, imp), (o3, ela), (o4, exp), (o5, sl) = (_job(c[1:]) for c in calls)
    gpus = [c[0] for c in calls]
    assert gpus == ["GPUS_PER_NODE=4"] * 3 + ["GPUS_PER_NODE=1"] * 2  # export / slice: one process
    for opts in (o1, o2, o3, o4, o5):
        assert "--parsable" in opts and "--partition=batch" in opts and "--time=60" in opts
        assert f"--output={run_dir}/logs/%x-%j.out" in opts
    assert "--nodes=2" in o1 and "--nodes=2" in o3 and "--nodes=1" in o4 and "--nodes=1" in o5
    assert not any(o.startswith("--dependency") for o in o1)
    for opts, dep in ((o2, 101), (o3, 102), (o4, 103), (o5, 103)):
        assert f"--dependency=afterok:{dep}" in opts and "--kill-on-invalid-dep=yes" in opts, opts
    assert train == ["train", "--config", "configs/tiny.yaml", f"logging.out_dir={run_dir}/parent",
                     "logging.wandb_mode=offline", "train.steps=9"]
    assert imp == ["importance", "--config", f"{run_dir}/parent/config.yaml", f"checkpoint.load={run_dir}/parent",
                   f"logging.out_dir={run_dir}/importance", "logging.wandb_mode=offline"]
    assert ela == ["elastic-train", "--config", f"{run_dir}/importance/sorted/config.yaml",
                   f"checkpoint.load={run_dir}/importance/sorted/checkpoints", f"logging.out_dir={run_dir}/elastic",
                   "logging.wandb_mode=offline", "parallel.tensor=2", "train.lr=1e-4"]
    assert exp[:6] == ["export-hf", "--checkpoint", f"{run_dir}/elastic", "--out", f"{run_dir}/hf", "--budget"]
    assert sl[:5] == ["slice", "--checkpoint", f"{run_dir}/elastic", "--out", f"{run_dir}/family"]
    assert (run_dir / "pipeline.jobs").read_text().split() == [
        "parent=101", "importance=102", "elastic=103", "export=104", "slice=105"]
    assert (run_dir / "logs").is_dir()


def test_pipeline_from_hf_imports_instead_of_training(sbatch_stub, tmp_path):
    hf = tmp_path / "nano"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    r = run([str(PIPELINE), "--out", str(tmp_path / "fam"), "--from-hf", str(hf)], base_env(sbatch_stub))
    assert r.returncode == 0, r.stderr
    first = _job(sbatch_calls(sbatch_stub)[0][1:])[1]
    assert first == ["import-hf", str(hf), "--out", str(tmp_path / "fam" / "parent")]
    assert len(sbatch_calls(sbatch_stub)) == 4


def test_pipeline_dry_run_submits_nothing(sbatch_stub, tmp_path):
    r = run([str(PIPELINE), "--dry-run", "--out", str(tmp_path / "fam")], base_env(sbatch_stub))
    assert r.returncode == 0, r.stderr
    assert sbatch_calls(sbatch_stub) == [] and not (tmp_path / "fam").exists()
    lines = [l for l in r.stdout.splitlines() if l.startswith("sbatch ")]
    assert len(lines) == 4 and "--dependency=afterok:\\<train\\>" in lines[1]


def test_pipeline_stops_when_a_submission_fails(sbatch_stub, tmp_path):
    r = run([str(PIPELINE), "--out", str(tmp_path / "fam")], base_env(sbatch_stub, STUB_SBATCH_FAIL_AT="102"))
    assert r.returncode != 0 and "sbatch failed for the importance job" in r.stderr
    assert len(sbatch_calls(sbatch_stub)) == 2


@pytest.mark.parametrize("args, message", [
    ([], "--out RUN_DIR is required"),
    (["--out"], "--out needs a value"),
    (["--out", "x", "--nodes", "0"], "--nodes must be a positive integer"),
    (["--out", "x", "--gpus-per-node", "two"], "--gpus-per-node must be a positive integer"),
    (["--out", "x", "--from-hf", "/nowhere"], "has no config.json"),
    (["--out", "x", "--bogus"], "unknown option '--bogus'"),
    (["--out", "x", "steps"], "neither an option nor a dotted key=value override"),
])
def test_pipeline_rejects_bad_usage(sbatch_stub, tmp_path, args, message):
    r = run([str(PIPELINE), *args], base_env(sbatch_stub), cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, (r.stdout, r.stderr)
    assert sbatch_calls(sbatch_stub) == []


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_pins_match_pyproject():
    docker = (ROOT / "Dockerfile").read_text()
    code = "\n".join(l for l in docker.splitlines() if not l.lstrip().startswith("#"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", code, re.M)
    assert base and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base.group(1)), "pin the NGC tag"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", code, re.M)
    assert "megatron-core==0.16.1" in pyproject["dependencies"] and "'megatron-core==0.16.1'" in code
    for pin in ("mamba-ssm==", "causal-conv1d=="):
        want = next(d for d in pyproject["optional-dependencies"]["gpu"] if d.startswith(pin))
        line = next((l for l in code.splitlines() if want in l), "")
        assert want in line and "--no-build-isolation" in line, f"{want} with --no-build-isolation"
    assert re.search(r"pip install --no-deps -e \.", code)
    assert re.search(r"^ENV PIP_CONSTRAINT=/opt/keep-base.txt", code, re.M), "keep the base image's torch"
    assert not re.search(r"pip install[^\n]*\btorch(==|>|<|\s|$)", code), "never reinstall torch"
    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    assert ".git" in ignore and "runs/" in ignore
    assert not {"elastic_megatron", "configs", "pyproject.toml", "launch", "slurm"} & set(ignore)
