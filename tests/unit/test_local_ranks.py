"""How many local ranks a CPU training run gets (local_ranks.py): one per core, up to the
micro-batches of a step and a count that divides them; one where the run owns a GPU or names its
own layout."""

from __future__ import annotations

import pytest
import torch

from elastic_megatron.config import load_config
from elastic_megatron.local_ranks import local_ranks


@pytest.mark.parametrize("overrides, cores, ranks", [
    ([], 1, 1),  # one core: the process itself
    ([], 2, 2),  # the demo's parent on the 2-core box: 2 micro-batches of 8 -> one each
    ([], 8, 2),  # more cores than micro-batches: a rank per micro-batch (4 threads each)
    (["train.micro_batch_size=2"], 3, 2),  # 8 micro-batches on 3 cores: 3 does not divide 8
    (["train.micro_batch_size=2"], 6, 4),
    (["train.micro_batch_size=16"], 2, 1),  # one micro-batch a step: nothing to share
    (["parallel.tensor=2"], 4, 1),  # model parallelism: the user's layout, not ours
    (["parallel.data=1"], 4, 1),  # an explicit data-parallel size
])
def test_one_rank_per_core_up_to_the_micro_batches(overrides, cores, ranks):
    assert local_ranks(load_config(None, overrides), cores) == ranks


def test_a_gpu_machine_keeps_one_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_ranks(load_config(None, []), 16) == 1
