"""Quantized bases, for real on CPU with bitsandbytes 8-bit (LLM.int8 runs on the CPU since 0.45):
without adapters the Trainer refuses before any step; with LoRA it trains and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ember import Trainer, TrainerCallback, TrainingArguments
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_gpt2(0).save_pretrained(folder)
    return folder


def load_8bit(folder):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )


def _args(out, **kw) -> TrainingArguments:
    base: dict = dict(
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        optim="adamw_torch",
        seed=2,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_quantized_base_without_adapters_is_refused_before_any_step(tmp_path, base_dir):
    model = load_8bit(base_dir)
    assert model.is_quantized
    trainer = Trainer(model, _args(tmp_path), train_dataset=lm_examples(16), data_collator=pad_lm_batch)
    with pytest.raises(ValueError, match="quantized .*bitsandbytes.* no adapters.*get_peft_model"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list(tmp_path.glob("checkpoint-*"))


def test_lora_on_an_8bit_base_trains_and_resumes_exactly(tmp_path, base_dir):
    def init():
        model = get_peft_model(load_8bit(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
        return model

    def trainer(out):
        return Trainer(
            model_init=init, args=_args(out), train_dataset=lm_examples(32), data_collator=pad_lm_batch
        )

    class Crash(Exception):
        pass

    class CrashAt2(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Crash

    reference = trainer(tmp_path / "ref")
    reference.train()
    int8 = reference.model.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight
    assert int8.dtype == torch.int8 and not int8.requires_grad
    start = dict(init().named_parameters())
    lora = {k: p for k, p in reference.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in k for k in lora)
    assert any(not torch.equal(p, start[k]) for k, p in lora.items())
    first = trainer(tmp_path / "run")
    first.add_callback(CrashAt2())
    with pytest.raises(Crash):
        first.train()
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    for k, p in lora.items():
        assert torch.equal(dict(resumed.model.named_parameters())[k], p), k
