"""Invariant 2: a TP / PP / DP run gives the single-process losses (gloo, CPU, fp32, 5 steps).

TP2 x PP2 runs with sequence parallelism (megatron's own, in its layers: the activations split
along the sequence over the TP ranks, the p2p tensor too; the norms' gradients summed over TP)
and recomputes every layer (model/recompute.py; the same numbers).

The DP=2 run uses the distributed optimizer and is stopped after step 3 and resumed: its 5 losses
must still be the single-process ones, so resume restores the sharded optimizer state exactly (the
bit-identical resume of one process is tests/unit/test_resume.py's). Plain DDP without the
distributed optimizer is covered by the elastic DP=2 run (test_elastic_equivalence.py)."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, read_metrics, run_cli

pytestmark = pytest.mark.distributed

STEPS = ["train.steps=5", *FAST]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_cli(["train", *STEPS, f"logging.out_dir={out}"], nproc=1)
    losses = read_metrics(out)
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5  # it really trains
    return losses


@pytest.mark.parametrize(
    "nproc,layout",
    [
        (2, ["parallel.tensor=2"]),
        (2, ["parallel.pipeline=2", "parallel.layers_in_first_stage=3"]),  # uneven 3 + 7 split
        (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true", "train.recompute=full"]),
        (2, ["parallel.data=2", "parallel.distributed_optimizer=true"]),
    ],
    ids=["tp2", "pp2-uneven", "tp2xpp2-sp-recompute", "dp2-distopt-resumed"],
)
def test_parallel_matches_single_process(reference, tmp_path, nproc, layout):
    if "parallel.distributed_optimizer=true" in layout:  # stop after step 3, then the same command resumes
        run_cli(["train", *STEPS, f"logging.out_dir={tmp_path}", *layout, "train.exit_at_step=3"], nproc=nproc)
        assert len(read_metrics(tmp_path)) == 3
    run_cli(["train", *STEPS, f"logging.out_dir={tmp_path}", *layout], nproc=nproc)
    losses = read_metrics(tmp_path)
    assert len(losses) == len(reference)
    diff = max(abs(a - b) for a, b in zip(losses, reference))
    assert diff <= 1e-5, f"{layout}: losses {losses} vs single-process {reference} (max diff {diff:.2e})"
