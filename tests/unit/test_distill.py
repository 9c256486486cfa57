"""KD loss: zero for identical logits, equal to torch's KL at TP=1, and equal at TP=2 (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO

WORKER = r'''
import json, os, sys, torch
from elastic_megatron.config import load_config
from elastic_megatron.parallel import ParallelLayout, init_distributed, destroy_distributed
from megatron.core import parallel_state as ps
from elastic_megatron.elastic.distill import kd_loss
world = int(os.environ.get("WORLD_SIZE", "1"))
cfg = load_config(None, [f"parallel.tensor={world}"])
init_distributed(ParallelLayout.resolve(cfg, world), 1)
g = torch.Generator().manual_seed(0)
s_full, t_full = torch.randn(5, 3, 64, generator=g) * 3, torch.randn(5, 3, 64, generator=g) * 3
r = ps.get_tensor_model_parallel_rank()
s = s_full.chunk(world, -1)[r].clone().requires_grad_(True)
loss = kd_loss(s, t_full.chunk(world, -1)[r], temperature=2.0)
loss.sum().backward()
grads = [torch.empty_like(s.grad) for _ in range(world)]
torch.distributed.all_gather(grads, s.grad.contiguous(), group=ps.get_tensor_model_parallel_group())
if torch.distributed.get_rank() == 0:
    json.dump({"loss": loss.tolist(), "grad": torch.cat(grads, -1).tolist()}, open(sys.argv[1], "w"))
destroy_distributed()
'''


def _run(tmp_path, nproc):
    script, out = tmp_path / "kd_worker.py", tmp_path / f"kd{nproc}.json"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(script), str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_kd_loss_zero_for_identical_logits_and_matches_torch_kl():
    from megatron.core import parallel_state as ps

    from elastic_megatron.elastic.distill import kd_loss

    if not ps.model_parallel_is_initialized():
        from elastic_megatron.config import load_config
        from elastic_megatron.parallel import ParallelLayout, init_distributed

        os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
        init_distributed(ParallelLayout.resolve(load_config(None), 1), 1)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 2, 64, generator=g) * 4
    assert kd_loss(logits, logits.clone()).abs().max().item() <= 1e-6
    other = torch.randn(7, 2, 64, generator=g) * 4
    want = F.kl_div(F.log_softmax(logits / 2, -1), F.log_softmax(other / 2, -1), log_target=True,
                    reduction="none").sum(-1) * 4
    assert torch.allclose(kd_loss(logits, other, temperature=2.0), want, atol=1e-5)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    kd_loss(a, other, temperature=2.0).sum().backward()
    (F.kl_div(F.log_softmax(b / 2, -1), F.log_softmax(other / 2, -1), log_target=True,
              reduction="none").sum(-1) * 4).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)  # the analytic gradient is torch's


@pytest.mark.distributed
def test_kd_loss_and_grad_equal_at_tp2(tmp_path):
    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    l1, l2 = torch.tensor(one["loss"]), torch.tensor(two["loss"])
    g1, g2 = torch.tensor(one["grad"]), torch.tensor(two["grad"])
    assert l1.abs().max() > 0.1
    assert (l1 - l2).abs().max().item() <= 1e-5 and (g1 - g2).abs().max().item() <= 1e-6
