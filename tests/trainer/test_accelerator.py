"""`trainer.accelerator`: a training_step written against transformers' Trainer (the way transformers
5's own training_step is written: compute_loss with num_items_in_batch, then accelerator.backward)
runs unchanged on ember and gives the same weights, with accumulation and on 2 processes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ember
from tests.helpers import RegressionDataset, lm_examples, pad_lm_batch, tiny_gpt2

transformers = pytest.importorskip("transformers")


def custom_trainer(base: type) -> type:
    """A subclass as users write it for transformers: only the base class differs."""

    class AcceleratorStep(base):  # type: ignore[misc, valid-type]
        syncs: list[bool]

        def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            model.train()
            inputs = self._prepare_inputs(inputs)
            with self.accelerator.autocast():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            if num_items_in_batch is None:
                loss = loss / self.args.gradient_accumulation_steps
            self.accelerator.backward(loss)
            self.__dict__.setdefault("syncs", []).append(bool(self.accelerator.sync_gradients))
            return loss.detach()

    return AcceleratorStep


def lm_args(lib: Any, out: str, **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        output_dir=out,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=3e-3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        optim="adamw_torch",
        adam_epsilon=1e-6,
        train_sampling_strategy="sequential",
    )
    base.update(kw)
    return lib.TrainingArguments(**base)


def train_custom(lib: Any, out: str, **kw: Any) -> Any:
    trainer = custom_trainer(lib.Trainer)(
        model=tiny_gpt2(seed=0),
        args=lm_args(lib, out, **kw),
        train_dataset=lm_examples(16, seed=1),
        data_collator=pad_lm_batch,
    )
    trainer.train()
    return trainer


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ember_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return train_custom(ember, str(tmp_path_factory.mktemp("ember")))


def test_an_accelerator_training_step_gives_transformers_weights_with_accumulation(tmp_path, ember_run):
    hf = train_custom(transformers, str(tmp_path / "hf"))
    start = tiny_gpt2(seed=0).state_dict()
    assert max_diff(weights(ember_run), start) > 1e-3  # it trained
    assert max_diff(weights(ember_run), weights(hf)) < 1e-5
    # accelerate's gradient state: only the last micro-batch of each step syncs.
    assert ember_run.syncs == hf.syncs == [False, True] * 4


def test_the_override_equals_ember_own_training_step(tmp_path, ember_run):
    plain = ember.Trainer(
        model=tiny_gpt2(seed=0),
        args=lm_args(ember, str(tmp_path / "plain")),
        train_dataset=lm_examples(16, seed=1),
        data_collator=pad_lm_batch,
    )
    plain.train()
    assert max_diff(weights(ember_run), weights(plain)) == 0.0


def test_two_processes_with_the_override_equal_one_process(tmp_path):
    from tests.strategy import launch

    single = train_custom(ember, str(tmp_path / "one"), per_device_train_batch_size=4)
    out = tmp_path / "two"
    out.mkdir()
    launch.check(launch.run(["-m", "tests.trainer.accelerator_worker", str(out)], nproc=2, timeout=150))
    from safetensors.torch import load_file

    two = load_file(str(out / "weights.safetensors"))
    assert max_diff({k: v for k, v in weights(single).items() if k in two}, two) < 1e-6
    report = (out / "members.txt").read_text().splitlines()
    assert report == [
        "num_processes=2 process_index=0 main=True",
        "gather=[0.0, 1.0] reduce_sum=1.0 reduce_mean=0.5",
        "pad=[[0, 0, 0], [1, 1, -1]]",
        "split=[[0, 1, 2], [3, 4]] padded=[[0, 1, 2], [3, 4, 4]]",
        "objects=['r0', 'r1'] metrics=[0, 10, 1, 11]",
        "type=MULTI_CPU",
        f"words={[f'x={float(x):.3f}' for x in RegressionDataset(7).x]}",
    ]


def test_members_on_one_process(tmp_path):
    trainer = ember.Trainer(model=tiny_gpt2(seed=0), args=lm_args(ember, str(tmp_path)))
    acc = trainer.accelerator
    assert (acc.num_processes, acc.process_index, acc.local_process_index) == (1, 0, 0)
    assert acc.is_main_process and acc.is_local_main_process and acc.device == torch.device("cpu")
    assert acc.distributed_type == "NO" and acc.mixed_precision == "no"
    assert not trainer.is_deepspeed_enabled and not trainer.is_fsdp_enabled
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(acc.gather(x), x) and torch.equal(acc.gather_for_metrics({"a": x})["a"], x)
    assert torch.equal(acc.reduce(x, "mean"), x) and torch.equal(acc.pad_across_processes(x, dim=1), x)
    assert acc.gather_for_metrics(["a", "b"]) == ["a", "b"]
    assert acc.unwrap_model(trainer.model) is trainer.model
    with acc.split_between_processes([1, 2, 3]) as share:
        assert share == [1, 2, 3]
    with acc.main_process_first():
        acc.wait_for_everyone()
    with pytest.raises(ValueError, match="reduction"):
        acc.reduce(x, "max")
    with pytest.raises(TypeError, match="use_gather_object"):
        acc.gather(["a"])


def test_clip_grad_norm_unscales_once_under_fp16(tmp_path):
    # fp16's GradScaler refuses a second unscale_ in one step: a subclass clipping in its
    # training_step must not break the step's own clipping (max_grad_norm), and sees real norms.
    from ember.strategy.precision import Fp16Precision

    class ClipInStep(ember.Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.accelerator.sync_gradients:
                self.norms.append(float(self.accelerator.clip_grad_norm_(model.parameters(), 1e9)))
            return loss

    args = lm_args(ember, str(tmp_path), max_steps=2, max_grad_norm=1.0)
    trainer = ClipInStep(
        model=tiny_gpt2(seed=0), args=args, train_dataset=lm_examples(8, seed=1), data_collator=pad_lm_batch
    )
    trainer.precision = Fp16Precision(torch.device("cpu"))
    assert trainer.accelerator.mixed_precision == "fp16"
    trainer.norms = []
    trainer.train()
    # Unscaled norms (the scaler's factor is 65536): a model this size has norms of order 1-10.
    assert len(trainer.norms) == 2 and all(0 < n < 100 for n in trainer.norms)
