"""Config and input errors under torchrun: one line, printed once (by rank 0), every rank exits 2.

torchrun itself then prints its summary of the failed workers and exits 1; that summary is where
each rank's exit code is read here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import FAST, REPO

pytestmark = pytest.mark.distributed


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "elastic_megatron.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["config", "input_after_init"])
def test_error_under_torchrun_is_one_line_and_every_rank_exits_2(tmp_path, case):
    if case == "config":  # caught by load_config, before any process group exists
        args, words = ["train", "train.stepz=1"], "config key 'train.stepz'"
    else:  # a missing checkpoint, found by every rank after the process groups are up
        args, words = ["elastic-train", *FAST, "parallel.tensor=2", f"checkpoint.load={tmp_path / 'missing'}",
                       f"logging.out_dir={tmp_path / 'out'}"], str(tmp_path / "missing")
    proc = torchrun(*args)
    text = proc.stdout + proc.stderr
    ours = [line for line in text.splitlines() if line.startswith("elastic-megatron: error:")]
    assert len(ours) == 1 and words in ours[0], text[-4000:]
    # no worker traceback: the only one is torchrun's own, ending in its ChildFailedError summary
    assert text.count("Traceback") <= 1 and "ChildFailedError" in text, text[-4000:]
    codes = re.findall(r"^\s+exitcode\s+:\s*(-?\d+)", text, flags=re.M)  # the summary, one per rank
    assert codes == ["2", "2"], text[-4000:]  # both ranks, none stopped by torchrun's SIGTERM
