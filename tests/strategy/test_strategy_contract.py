"""One contract, every strategy: the single-process one in pytest, DDP, FSDP2 and DeepSpeed in a
2-process gloo job. What the trainer, the evaluation loop and the checkpoint code rely on holds
for each of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ember import TrainingArguments
from ember.strategy import SingleDevice, Strategy, build_strategy
from tests.helpers import tiny_gpt2
from tests.strategy.conftest import run_suite

QUIET = {"PYTHONWARNINGS": "ignore::FutureWarning"}


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_suite(tmp_path_factory.mktemp("contract"), "contract", timeout=300)


def _reports(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"contract-{r}.json").read_text()) for r in range(2)]


def test_single_device_keeps_the_contract(tmp_path):
    strategy = build_strategy(TrainingArguments(str(tmp_path), use_cpu=True, bf16=True))
    assert isinstance(strategy, SingleDevice) and isinstance(strategy, Strategy)
    assert (strategy.rank, strategy.world_size, strategy.dp_rank, strategy.dp_world_size) == (0, 1, 0, 1)
    assert strategy.is_main and strategy.precision.name == "bf16"
    rows = torch.arange(6.0).reshape(3, 2)
    assert strategy.gather(rows) is rows  # evaluation gathers unconditionally; one process pays nothing
    assert float(strategy.all_reduce_sum(torch.tensor(2.0))) == 2.0
    assert strategy.any_rank(True) and not strategy.any_rank(False)
    model = strategy.place_model(tiny_gpt2())
    assert {p.device for p in model.parameters()} == {strategy.device}
    assert strategy.model_state_dict(model).keys() == tiny_gpt2().state_dict().keys()


def test_a_model_spread_over_devices_is_left_where_it_is(tmp_path):
    strategy = build_strategy(TrainingArguments(str(tmp_path), use_cpu=True))
    model = tiny_gpt2()
    # As transformers marks a model loaded with device_map over two GPUs; ember must not move it.
    model.hf_device_map = {"transformer.h.0": 0, "transformer.h.1": 1}
    sentinel = torch.device("meta")
    strategy.device = sentinel  # any .to(strategy.device) would now fail loudly
    assert strategy.place_model(model) is model
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "deepspeed"])
def test_multi_process_strategies_keep_the_contract(contract, kind):
    reports = _reports(contract)
    if kind not in reports[0]:
        pytest.skip("deepspeed is not installed")
    for rank, report in enumerate(r[kind] for r in reports):
        assert report["is_strategy"]
        assert report["ranks"] == [rank, 2, rank, 2]
        assert report["main"] == (rank == 0)
        assert report["sum"] == 3.0
        assert report["any"] == [True, False]
        # Rank 0 sends 1 row of 2 columns, rank 1 two rows of 3: padded with -100, rank 0 first.
        assert report["gather"] == [[0.0, 0.0, -100.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
        assert report["precision"] == "fp32"
        assert report["placed_on"] == ["cpu"]
    # The full state dict counts on the main process (FSDP gathers it there only): every key.
    assert reports[0][kind]["full_keys"] == reports[0][kind]["own_keys"]


def test_fsdp_materialises_a_meta_model_shard_by_shard_and_trains(contract):
    meta = json.loads((contract / "meta-0.json").read_text())
    assert meta["placed"] == ["cpu"]  # real storage after construction: no parameter left on meta
    assert torch.isfinite(torch.tensor(meta["train_loss"]))
    state = load_file(str(contract / "meta-0.safetensors"))
    assert state and all(torch.isfinite(t).all() for t in state.values())
