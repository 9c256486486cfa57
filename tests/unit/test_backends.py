"""The backend ladder (compat/backends.py): te -> triton -> torch, chosen once, said once, forced rungs checked.

GPU machines are stood in for by fake probes; mamba-ssm's Triton ops by a fake package on disk whose
`__init__` fails the way a wheel built with MAMBA_SKIP_CUDA_BUILD does (no selective_scan_cuda).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from elastic_megatron.compat import backends
from elastic_megatron.compat.backends import BackendUnavailable, Probe, choose, describe, mamba_kernels
from tests.conftest import REPO

GPU_FULL = Probe(cuda=True, te=None, triton=None)
GPU_NO_TE = Probe(cuda=True, te="transformer_engine does not import (ModuleNotFoundError: No module named "
                                "'transformer_engine')", triton=None)
GPU_BARE = Probe(cuda=True, te=GPU_NO_TE.te, triton="mamba-ssm's Triton ops do not import (ImportError: "
                                                     "mamba-ssm is not installed)")


@pytest.mark.parametrize("p,auto,local,kernels", [
    (GPU_FULL, "te", "triton", "triton"),
    (GPU_NO_TE, "triton", "triton", "triton"),
    (GPU_BARE, "torch", "torch", "torch"),
    (Probe(cuda=True, te=None, triton=GPU_BARE.triton), "te", "torch", "torch"),  # TE without mamba-ssm
], ids=["te+mamba-ssm", "mamba-ssm-only", "bare", "te-only"])
def test_auto_takes_the_first_rung_that_runs(p, auto, local, kernels):
    assert choose("auto", p) == auto
    assert choose("local", p) == local
    assert mamba_kernels(auto, p) == kernels
    assert choose("torch", p) == "torch" and mamba_kernels("torch", p) == "torch"  # always possible


def test_a_forced_rung_that_cannot_run_is_one_line_that_says_why_and_what_to_do():
    with pytest.raises(BackendUnavailable) as e:
        choose("te", GPU_BARE)
    msg = str(e.value)
    assert "\n" not in msg and "model.backend=te" in msg and "No module named 'transformer_engine'" in msg
    assert "model.backend=auto" in msg
    with pytest.raises(BackendUnavailable, match="model.backend=triton: .*mamba-ssm is not installed"):
        choose("triton", GPU_BARE)
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        choose("cudnn", GPU_FULL)
    assert choose("te", GPU_FULL) == "te" and choose("triton", GPU_NO_TE) == "triton"


def test_describe_names_what_runs_and_what_was_passed_over():
    assert describe("te", GPU_FULL) == "backend te (Transformer Engine layers, mamba-ssm Triton kernels)"
    line = describe("torch", GPU_BARE)
    assert line.startswith("backend torch (megatron local layers, pure-PyTorch Mamba scan); passed over te: ")
    assert "triton: mamba-ssm's Triton ops do not import" in line


def test_this_cpu_machine_picks_the_pure_pytorch_scan():
    p = backends.probe()
    assert not p.cuda and "no CUDA device" in p.te and "no CUDA device" in p.triton
    assert choose("auto", p) == "torch"
    from elastic_megatron.compat import mamba_kernels as k, select_backend

    assert select_backend("auto") == "torch"
    import megatron.core.ssm.mamba_mixer as mixer

    assert mixer.mamba_chunk_scan_combined is k.mamba_chunk_scan_combined
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        select_backend("triton")


def test_announced_once_per_process_on_rank_0_only(capsys, monkeypatch):
    monkeypatch.setattr(backends, "_ANNOUNCED", set())
    backends.announce("torch", GPU_BARE)
    backends.announce("torch", GPU_BARE)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(backends.ANNOUNCE + "torch (")
    monkeypatch.setattr(backends, "_ANNOUNCED", set())
    monkeypatch.setenv("RANK", "1")
    backends.announce("torch", GPU_BARE)
    assert capsys.readouterr().err == ""


FAKE_SSD = '''
from elastic_megatron.compat import mamba_kernels as k
CALLS = []
def mamba_chunk_scan_combined(*a, **kw):
    CALLS.append("scan")
    return k.mamba_chunk_scan_combined(*a, **kw)
def mamba_split_conv1d_scan_combined(*a, **kw):
    raise AssertionError("needs causal-conv1d's CUDA extension, which this install lacks")
causal_conv1d_fwd_function = None
'''
FAKE_NORM = '''
from elastic_megatron.compat import mamba_kernels as k
CALLS = []
def rmsnorm_fn(*a, **kw):
    CALLS.append("norm")
    return k.rms_norm_gated(*a, **kw)
class RMSNorm(k.RMSNormGated):
    pass
'''
CHECK = '''
import torch
from elastic_megatron.compat import mamba, mamba_kernels as k
assert mamba.why_not_mamba_ssm_triton() is None, mamba.why_not_mamba_ssm_triton()
mamba.use_kernels("triton")
import megatron.core.ssm.mamba_mixer as mixer
from mamba_ssm.ops.triton import ssd_combined as ssd, layernorm_gated as norm
assert mixer.mamba_chunk_scan_combined is ssd.mamba_chunk_scan_combined
assert mixer.RMSNormGated is norm.RMSNorm and issubclass(mixer.ExtendedRMSNorm, norm.RMSNorm)
assert mixer.HAVE_MAMBA_SSM and mamba.kernels_in_use() == "triton"
# no causal-conv1d: the fused block is composed around mamba-ssm's scan and norm, same numbers as ours
g = torch.Generator().manual_seed(0)
h, p, n, d = 4, 8, 16, 32
zxbcdt = torch.randn(2, 24, 2 * d + 2 * n + h, generator=g)
args = (zxbcdt, torch.randn(d + 2 * n, 4, generator=g), torch.randn(d + 2 * n, generator=g),
        torch.randn(h, generator=g), -torch.rand(h, generator=g), torch.randn(h, generator=g), 8)
kw = dict(rmsnorm_weight=torch.rand(d, generator=g) + 0.5, headdim=p, ngroups=1)
ours = k.mamba_split_conv1d_scan_combined(*args, **kw)
theirs = mixer.mamba_split_conv1d_scan_combined(*args, **kw)
assert ssd.CALLS == ["scan"] and norm.CALLS == ["norm"], (ssd.CALLS, norm.CALLS)
torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
mamba.use_kernels("torch")
assert mixer.mamba_chunk_scan_combined is k.mamba_chunk_scan_combined and mamba.kernels_in_use() == "torch"
print("ok")
'''


def test_mamba_ssm_triton_ops_load_without_its_cuda_extensions(tmp_path):
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    # what `import mamba_ssm` does in a MAMBA_SKIP_CUDA_BUILD wheel: its __init__ pulls in the CUDA scan
    (pkg / "__init__.py").write_text("import selective_scan_cuda  # noqa\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text(textwrap.dedent(FAKE_SSD))
    (pkg / "ops" / "triton" / "layernorm_gated.py").write_text(textwrap.dedent(FAKE_NORM))
    path = os.pathsep.join(filter(None, [str(tmp_path), str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]


def test_a_missing_mamba_ssm_is_named():
    from elastic_megatron.compat import mamba

    if "mamba_ssm" in sys.modules or __import__("importlib").util.find_spec("mamba_ssm") is not None:
        pytest.skip("mamba-ssm is installed here")
    assert "mamba-ssm is not installed" in mamba.why_not_mamba_ssm_triton()


def test_a_forced_backend_through_the_cli_is_one_line(tmp_path):
    from tests.unit.test_cli import one_line_error

    def cli(*args):  # this interpreter's CLI (the portability check runs this file in another venv)
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        return subprocess.run([sys.executable, "-m", "elastic_megatron.cli", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "never"
    one_line_error(cli("train", "model.backend=triton", "train.steps=1", "logging.wandb_mode=disabled",
                       f"logging.out_dir={out}"), "model.backend=triton", "no CUDA device", "model.backend=auto")
    one_line_error(cli("train", "model.backend=cudnn", f"logging.out_dir={out}"), "model.backend", "triton")
