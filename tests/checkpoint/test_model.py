"""The model save/load pair through the Trainer: PEFT adapters, sharded safetensors, plain modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.checkpoint import model as model_io
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2


class Crash(Exception):
    pass


class CrashAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(self.step)


def lora_gpt2(seed: int = 0, dropout: float = 0.1, second_adapter: bool = False):
    from peft import LoraConfig, get_peft_model

    base = tiny_gpt2(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["c_attn", "c_proj"])
    model = get_peft_model(base, config)
    if second_adapter:
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"]))
    return model


def lora_init():
    return lora_gpt2()


def _args(out: Path, **overrides) -> TrainingArguments:
    kw: dict = dict(
        output_dir=str(out),
        max_steps=6,
        save_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=3,
        optim="adamw_torch",
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _trainer(out: Path, model_init=lora_init, **overrides) -> Trainer:
    return Trainer(
        model_init=model_init,
        args=_args(out, **overrides),
        train_dataset=lm_examples(40, seed=1),
        eval_dataset=lm_examples(8, seed=2),
        data_collator=pad_lm_batch,
    )


def _trainable_and_optimizer(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    for pid, st in trainer.optimizer.state_dict()["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{pid}.{name}"] = value.clone()
    return out


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _resume_matches(tmp_path: Path, stop_at: int, model_init=lora_init, **overrides) -> Trainer:
    reference = _trainer(tmp_path / "ref", model_init, **overrides)
    reference.train()
    first = _trainer(tmp_path / "run", model_init, **overrides)
    first.add_callback(CrashAfterSave(stop_at))
    with pytest.raises(Crash):
        first.train()
    resumed = _trainer(tmp_path / "run", model_init, **overrides)
    resumed.train(resume_from_checkpoint=True)
    _assert_equal(_trainable_and_optimizer(reference), _trainable_and_optimizer(resumed))
    ref_losses = [h["loss"] for h in reference.state.log_history if "loss" in h]
    assert ref_losses == [h["loss"] for h in resumed.state.log_history if "loss" in h]
    return resumed


def test_lora_checkpoint_holds_the_adapter_only_and_resumes_bit_exactly(tmp_path):
    resumed = _resume_matches(tmp_path, stop_at=2)
    ckpt = tmp_path / "run" / "checkpoint-4"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"} <= names
    assert "model.safetensors" not in names and "model.safetensors.index.json" not in names
    # The optimizer holds the LoRA parameters only, not the frozen base.
    trainable = [p for p in resumed.model.parameters() if p.requires_grad]
    in_optimizer = [p for g in resumed.optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == len(trainable) < len(list(resumed.model.parameters()))
    assert all(p.requires_grad for p in in_optimizer)


def test_save_model_loads_with_peft_from_pretrained_and_auto_class(tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    tiny_gpt2(0).save_pretrained(base_dir)  # a base the adapter config can name

    def init():
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))

    trainer = _trainer(tmp_path / "out", init, max_steps=3, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    final = tmp_path / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    batch = pad_lm_batch(lm_examples(4, seed=5))
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits
    via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(final)).eval()
    via_auto = AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()
    with torch.no_grad():
        assert torch.equal(via_peft(**batch).logits, expected)
        assert torch.equal(via_auto(**batch).logits, expected)
    # And the training changed the adapter: the untrained one gives other logits.
    fresh = init().eval()
    with torch.no_grad():
        assert not torch.equal(fresh(**batch).logits, expected)


def test_lora_evaluate_predict_and_load_best_model_at_end(tmp_path):
    class BestAtStep4:
        """Best at the second evaluation (step 4), so the best checkpoint is not the last."""

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, eval_pred):
            self.calls += 1
            return {"score": -abs(self.calls - 2)}

    trainer = _trainer(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
    )
    trainer.compute_metrics = BestAtStep4()
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Snap(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = {
                k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad
            }

    trainer.add_callback(Snap())
    trainer.train()
    assert trainer.state.best_global_step == 4
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    now = {k: v for k, v in trainer.model.named_parameters() if v.requires_grad}
    _assert_equal(seen[4], {k: v.detach() for k, v in now.items()})
    assert not all(torch.equal(seen[6][k], now[k]) for k in now)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    out = trainer.predict(lm_examples(5, seed=9))
    assert out.predictions.shape[0] == 5 and out.predictions.shape[-1] == 97


def test_several_adapters_only_the_active_one_trains_and_all_are_saved(tmp_path):
    def init():
        model = lora_gpt2(0, second_adapter=True)
        model.set_adapter("second")  # PEFT: only the active adapter requires grad
        return model

    resumed = _resume_matches(tmp_path, stop_at=4, model_init=init)
    ckpt = tmp_path / "run" / "checkpoint-6"
    assert (ckpt / "adapter_model.safetensors").exists()
    assert (ckpt / "second" / "adapter_model.safetensors").exists()
    trainable = [k for k, p in resumed.model.named_parameters() if p.requires_grad]
    assert trainable and all(".second." in k for k in trainable)
    untouched = lora_gpt2(0, second_adapter=True)
    for k, p in resumed.model.named_parameters():
        if ".default." in k:
            assert torch.equal(p, dict(untouched.named_parameters())[k]), k


def test_adapter_of_another_shape_is_refused_with_the_reason(tmp_path):
    from peft import LoraConfig, get_peft_model

    trainer = _trainer(tmp_path, max_steps=2)
    trainer.train()
    other = get_peft_model(tiny_gpt2(0), LoraConfig(r=8, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="does not fit the model"):
        model_io.load_model_files(other, tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="PEFT adapter"):
        model_io.load_model_files(tiny_gpt2(0), tmp_path / "checkpoint-2")


def test_remove_unused_columns_reads_the_base_models_forward(tmp_path):
    rows = [dict(r, text="unused", source=1) for r in lm_examples(16, seed=1)]
    from ember.data import remove_unused_columns

    pruned = remove_unused_columns(rows, lora_gpt2(0), ["labels"], description="training")
    assert set(pruned[0]) == {"input_ids", "labels"}
    trainer = Trainer(
        lora_gpt2(0),
        _args(tmp_path, max_steps=2, save_strategy="no"),
        train_dataset=rows,
        data_collator=pad_lm_batch,
    )
    assert trainer.train().global_step == 2


def test_sharded_checkpoint_resumes_bit_exactly_and_reloads_as_best(tmp_path, monkeypatch):
    # The tiny GPT-2 is ~120 KB: 40KB shards give several files and an index.
    monkeypatch.setattr(model_io, "MAX_SHARD_SIZE", "40KB")
    resumed = _resume_matches(tmp_path, stop_at=2, model_init=lambda: tiny_gpt2(0))
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert (ckpt / "model.safetensors.index.json").exists() and not (ckpt / "model.safetensors").exists()
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1
    # Best model: reload checkpoint-4 into the trained model and compare with a from_pretrained copy.
    from transformers import AutoModelForCausalLM

    resumed.strategy.load_model_weights(resumed.model, ckpt)
    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt))
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_sharded_checkpoint_is_loaded_by_load_best_model_at_end(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "MAX_SHARD_SIZE", "40KB")
    trainer = _trainer(
        tmp_path,
        lambda: tiny_gpt2(0),
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        learning_rate=0.5,  # diverges, so an early checkpoint is the best
    )
    saved: dict[int, dict[str, torch.Tensor]] = {}

    class Snap(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            saved[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}

    trainer.add_callback(Snap())
    trainer.train()
    best = trainer.state.best_global_step
    assert (Path(trainer.state.best_model_checkpoint) / "model.safetensors.index.json").exists()
    _assert_equal(saved[best], dict(trainer.model.state_dict()))
