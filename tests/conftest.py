"""Shared test set-up: one thread (the machine is shared), offline, small helpers."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_ember_log_level():
    # TrainingArguments sets the "ember" logger's level for the process (log_level_replica on a
    # non-zero rank, as transformers does); without this a test that fakes RANK would silence the
    # INFO records later tests read with caplog, depending on the order the files run in.
    logger = logging.getLogger("ember")
    level = logger.level
    yield
    logger.setLevel(level)
