"""use_liger_kernel (ember/models/liger.py). liger-kernel is not installed here (it pulls triton, a
286 MB GPU-only wheel), so these tests run the "not installed" fallback for real: ember's chunked
loss, with one warning that says why. The GPU path (Liger patching the model) is not run here."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from ember import Trainer, TrainingArguments
from tests.helpers import lm_examples, pad_lm_batch, tiny_llama

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is not None, reason="tests the fallback without liger-kernel"
)


def _losses(tmp_path, name: str, **kw) -> list[float]:
    args = TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=3, logging_steps=1, learning_rate=1e-3, report_to="none", disable_tqdm=True,
        use_cpu=True, save_strategy="no", seed=3, loss_chunk_size=16, **kw,
    )  # fmt: skip
    trainer = Trainer(tiny_llama(0), args, train_dataset=lm_examples(24), data_collator=pad_lm_batch)
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_without_liger_the_run_uses_the_chunked_loss_and_says_why_once(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ember"):
        liger = _losses(tmp_path, "liger", use_liger_kernel=True, liger_kernel_config={"rope": True})
    notes = [r.getMessage() for r in caplog.records if "use_liger_kernel" in r.getMessage()]
    assert len(notes) == 1
    assert "not installed" in notes[0] and "pip install liger-kernel" in notes[0] and "chunked" in notes[0]
    chunked = _losses(tmp_path, "chunked", chunked_loss=True)
    plain = _losses(tmp_path, "plain", chunked_loss=False)
    assert liger == chunked  # the same path, bit for bit
    assert liger != plain  # which the plain loss is not (other summation order)
    assert torch.allclose(torch.tensor(liger), torch.tensor(plain), atol=1e-4)


def test_an_unknown_liger_key_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="'rms_nrom'.*Did you mean 'rms_norm'"):
        TrainingArguments(output_dir="x", use_liger_kernel=True, liger_kernel_config={"rms_nrom": True})


def test_liger_config_from_a_command_line_is_json() -> None:
    args = TrainingArguments(output_dir="x", use_liger_kernel=True, liger_kernel_config='{"swiglu": false}')
    assert args.liger_kernel_config == {"swiglu": False}
    with pytest.raises(ValueError, match="liger_kernel_config.*JSON"):
        TrainingArguments(output_dir="x", liger_kernel_config="{swiglu}")
