"""Shared fixtures of the multi-process tests: single-process references computed in pytest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.strategy import launch


def run_suite(out: Path, suite: str, *extra: str, nproc: int = 2, timeout: float = 150) -> Path:
    launch.check(launch.run(["-m", "tests.strategy.worker", suite, str(out), *extra], nproc, timeout))
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "param.") -> float:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


@pytest.fixture(scope="session")
def single_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The LM job on one process with twice the per-device batch: what two ranks must reproduce."""
    from tests.strategy.worker import LM_EVAL, lm_examples, lm_state, lm_trainer, losses

    trainer = lm_trainer(str(tmp_path_factory.mktemp("single")), per_device_train_batch_size=4)
    result = trainer.train()
    metrics = trainer.evaluate()
    pred = trainer.predict(lm_examples(LM_EVAL, seed=2))
    state = lm_state(trainer)
    state["predictions"] = torch.from_numpy(pred.predictions).float()
    state["label_ids"] = torch.from_numpy(pred.label_ids)
    return {"state": state, "losses": losses(trainer), "train_loss": result.training_loss, "eval": metrics}
