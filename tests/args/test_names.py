"""Each name list is written once (ember/args/names.py); the arguments, the enums scripts use, and the
parts that implement the names agree with it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ember import TrainingArguments
from ember.args import OptimizerNames, SchedulerType
from ember.args.names import LOW_RANK_OPTIMIZERS, OPTIMIZER_NAMES, SAMPLING_STRATEGIES, SCHEDULER_NAMES
from ember.data import make_train_batch_sampler
from ember.engine.optim import build_optimizer, build_scheduler
from tests.helpers import RegressionModel


def test_the_enums_carry_the_same_names():
    assert tuple(m.value for m in SchedulerType) == SCHEDULER_NAMES
    assert tuple(m.value for m in OptimizerNames) == OPTIMIZER_NAMES


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_name_is_accepted_and_built(tmp_path, name):
    kwargs = {"min_lr_rate": 0.1} if "min_lr" in name else {"num_decay_steps": 4} if "stable" in name else {}
    evaluates = {"eval_strategy": "steps", "eval_steps": 2} if "plateau" in name else {}
    args = TrainingArguments(
        str(tmp_path), lr_scheduler_type=name, lr_scheduler_kwargs=kwargs, warmup_steps=1, **evaluates
    )
    optimizer = torch.optim.SGD(RegressionModel().parameters(), lr=0.1)
    assert build_scheduler(args, optimizer, 10) is not None


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_name_is_accepted_and_built(tmp_path, name):
    """Built, or refused naming `optim` (tests/test_optimizers.py checks each name's reason)."""
    needs = {"optim_target_modules": "all-linear"} if name in LOW_RANK_OPTIMIZERS else {}
    try:
        args = TrainingArguments(str(tmp_path), optim=name, use_cpu=True, **needs)
        optimizer = build_optimizer(args, RegressionModel())
    except (ValueError, ImportError) as err:
        assert "optim" in str(err) and name in str(err)
    else:
        assert isinstance(optimizer, torch.optim.Optimizer)


@pytest.mark.parametrize("name", SAMPLING_STRATEGIES)
def test_every_sampling_strategy_is_accepted_and_built(tmp_path, name):
    args = TrainingArguments(str(tmp_path), train_sampling_strategy=name, per_device_train_batch_size=2)
    data = [{"input_ids": [1] * (i + 1)} for i in range(6)]
    assert len(make_train_batch_sampler(data, args)) == 3


def test_the_name_lists_import_without_torch():
    code = "import sys, ember.args.names, ember.args; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
