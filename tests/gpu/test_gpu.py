"""CUDA-only checks (skipped without a GPU): each rung of the backend ladder that runs here (te, triton,
torch; compat/backends.py) agrees with the CPU path, and mamba-ssm's Triton kernels with our scan."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FAST, read_metrics, run_cli

pytestmark = pytest.mark.gpu
BACKENDS = ["torch", "triton", "te"]


def _triton_or_skip():
    from elastic_megatron.compat import mamba

    why = mamba.why_not_mamba_ssm_triton()
    if why:
        pytest.skip(why)
    return mamba.triton_ops()


def _runs_here_or_skip(backend: str) -> None:
    from elastic_megatron.compat import backends

    try:
        backends.choose(backend, backends.probe())
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))


def test_pure_torch_scan_matches_mamba_ssm_triton():
    ssd, _ = _triton_or_skip()
    from elastic_megatron.compat import mamba_kernels as k

    g = torch.Generator(device="cuda").manual_seed(0)
    b, l, h, p, grp, n = 2, 100, 8, 16, 2, 16
    x = torch.randn(b, l, h, p, device="cuda", generator=g)
    dt = torch.randn(b, l, h, device="cuda", generator=g)
    A = -torch.rand(h, device="cuda", generator=g) - 0.5
    B = torch.randn(b, l, grp, n, device="cuda", generator=g)
    C = torch.randn(b, l, grp, n, device="cuda", generator=g)
    D, dt_bias = torch.randn(h, device="cuda", generator=g), torch.randn(h, device="cuda", generator=g)
    z = torch.randn(b, l, h, p, device="cuda", generator=g)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    ref = ssd.mamba_chunk_scan_combined(x, dt, A, B, C, 32, **kw)
    ours = k.mamba_chunk_scan_combined(x, dt, A, B, C, 32, **kw)
    assert (ref - ours).abs().max().item() < 1e-3


def test_split_conv_scan_composed_on_mamba_ssm_triton_matches_ours():
    """Without causal-conv1d the triton rung composes the Mamba block around mamba-ssm's scan and norm."""
    ssd, norm = _triton_or_skip()
    from elastic_megatron.compat import mamba_kernels as k

    g = torch.Generator(device="cuda").manual_seed(0)
    h, p, n, d, conv = 8, 16, 16, 128, 4
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    args = (r(2, 96, 2 * d + 2 * n + h), r(d + 2 * n, conv), r(d + 2 * n), r(h), -torch.rand(h, device="cuda") - 0.5,
            r(h), 32)
    kw = dict(rmsnorm_weight=r(d).abs() + 0.5, headdim=p, ngroups=1)
    ref = k.mamba_split_conv1d_scan_combined(*args, **kw)
    ours = k.split_conv1d_scan_on(ssd.mamba_chunk_scan_combined, norm.rmsnorm_fn)(*args, **kw)
    assert (ref - ours).abs().max().item() < 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_parent_trains_on_gpu_like_on_cpu(tmp_path, backend):
    _runs_here_or_skip(backend)
    args = ["train", "train.steps=5", *FAST, "train.precision=fp32", f"model.backend={backend}"]
    run_cli([*args, f"logging.out_dir={tmp_path / 'gpu'}"], nproc=1)
    run_cli([*args, f"logging.out_dir={tmp_path / 'cpu'}", "model.backend=local"], nproc=1,
            env={"CUDA_VISIBLE_DEVICES": ""})
    gpu, cpu = read_metrics(tmp_path / "gpu"), read_metrics(tmp_path / "cpu")
    assert max(abs(a - b) for a, b in zip(gpu, cpu)) < 5e-3, (gpu, cpu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_elastic_training_on_gpu_tracks_cpu(tmp_path, backend):
    """The elastic path on CUDA (router, masks, KD, recomputation on the GPU, bf16 with fp32 main
    grads) against the same run in fp32 on the CPU: the same budgets drawn, losses within 2%."""
    _runs_here_or_skip(backend)
    from tests.conftest import make_sorted_parent

    parent = make_sorted_parent(tmp_path / "parent", [*FAST, "data.seq_length=32", "train.micro_batch_size=2",
                                                      "train.global_batch_size=4"])
    args = ["elastic-train", *parent, *FAST, "curriculum=[{name: s, steps: 3}]", "train.recompute=full"]
    run_cli([*args, f"model.backend={backend}", "train.precision=bf16", f"logging.out_dir={tmp_path / 'gpu'}"])
    run_cli([*args, "model.backend=local", "train.precision=fp32", f"logging.out_dir={tmp_path / 'cpu'}"],
            env={"CUDA_VISIBLE_DEVICES": ""})
    gpu, cpu = read_metrics(tmp_path / "gpu"), read_metrics(tmp_path / "cpu")
    assert len(gpu) == len(cpu) == 3
    assert all(abs(a - b) <= 2e-2 * max(abs(b), 1e-3) for a, b in zip(gpu, cpu)), (gpu, cpu)
    seen = lambda d: read_metrics(d, "budgets_seen")  # noqa: E731
    assert seen(tmp_path / "gpu") == seen(tmp_path / "cpu")
