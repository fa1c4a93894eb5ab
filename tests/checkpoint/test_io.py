"""CheckpointIO (`ember.checkpoint.io`): the one place that names checkpoint files; what it writes
comes back, and what is missing is said (None, or an error naming the file)."""

from __future__ import annotations

import pytest
import torch

from ember.checkpoint.io import CheckpointIO, ShardedState, partition_name, rank_name
from tests.pickle_check import assert_no_pickle


def test_named_state_round_trips_through_the_layout(tmp_path):
    io = CheckpointIO()
    optimizer = {"state": {0: {"exp_avg": torch.arange(4.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    io.write_optimizer(tmp_path, optimizer)
    io.write_trainer(tmp_path, {"scheduler": {}, "epoch": 2})
    io.write_rank(tmp_path, 1, {"rng": {"seed": torch.tensor([7])}})
    io.write_partition(tmp_path, 1, {"stage": 2, "fp32_partitions": [torch.ones(3)]})
    io.write_run_files(tmp_path, '{"global_step": 3}', "{}")

    back = io.read_optimizer(tmp_path)
    assert back is not None and torch.equal(back["state"][0]["exp_avg"], torch.arange(4.0))
    assert back["param_groups"][0]["lr"] == 0.1
    assert io.has_trainer(tmp_path) and io.read_trainer(tmp_path)["epoch"] == 2
    rank1 = io.read_rank(tmp_path, 1)
    assert rank1 is not None and int(rank1["rng"]["seed"]) == 7
    assert torch.equal(io.read_partition(tmp_path, 1)["fp32_partitions"][0], torch.ones(3))
    assert io.trainer_state_path(tmp_path).read_text() == '{"global_step": 3}'
    assert (tmp_path / f"{rank_name(1)}.json").exists() and (tmp_path / f"{partition_name(1)}.json").exists()
    assert_no_pickle(tmp_path)


def test_what_a_checkpoint_lacks_is_none_or_an_error_naming_the_file(tmp_path):
    io = CheckpointIO()
    assert io.read_optimizer(tmp_path) is None  # sharded or save_only_model
    assert io.read_rank(tmp_path, 3) is None  # written by fewer processes
    assert not io.has_trainer(tmp_path) and not io.has_sharded(tmp_path)
    with pytest.raises(ValueError, match="deepspeed-rank-1.json.*same world size"):
        io.read_partition(tmp_path, 1)


@pytest.mark.parametrize("async_", [False, True])
def test_sharded_state_is_copied_only_when_the_write_runs_in_the_background(async_):
    live = torch.zeros(3)
    state = ShardedState({"model": {"w": live}}, {"param_groups": []})
    io = CheckpointIO(async_=async_)
    detached = io.detach_sharded(state)
    io.close()
    live.add_(1.0)  # training goes on
    seen = detached.tensors["model"]["w"]
    assert torch.equal(seen, torch.zeros(3)) == async_
