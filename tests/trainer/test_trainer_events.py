"""The loop fires callback events exactly in the order the timeline in ember/callbacks/events.py says."""

from __future__ import annotations

import pytest

from ember import Trainer, TrainingArguments
from ember.callbacks.events import EventRecorder, TimelineError, check_events
from tests.helpers import RegressionDataset, RegressionModel


def _run(tmp_path, **kw) -> list[str]:
    recorder = EventRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        **kw,
    )
    trainer = Trainer(
        RegressionModel(),
        args,
        train_dataset=RegressionDataset(20),
        eval_dataset=RegressionDataset(6),
        callbacks=[recorder],
    )
    trainer.train()
    trainer.evaluate()
    trainer.predict(RegressionDataset(5))
    return recorder.events


@pytest.mark.parametrize(
    "kw",
    [
        dict(
            gradient_accumulation_steps=2,
            logging_steps=1,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=3,
        ),
        dict(logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch", eval_on_start=True),
        dict(gradient_accumulation_steps=3, logging_first_step=True, save_strategy="no", max_steps=3),
    ],
)
def test_events_follow_the_documented_timeline(tmp_path, kw):
    events = _run(tmp_path, **kw)
    check_events(events)  # raises TimelineError naming the first event out of place
    ga = kw.get("gradient_accumulation_steps", 1)
    # The grammar cannot count: each full optimizer step has GA-1 substeps.
    steps = events.count("on_step_begin")
    assert steps == events.count("on_step_end") == events.count("on_optimizer_step")
    # 20 samples / batch 4 = 5 micro-batches an epoch; the last step of an epoch may be short.
    micro_batches_per_epoch = 5
    epochs = events.count("on_epoch_begin")
    full, rest = divmod(micro_batches_per_epoch, ga)
    expected_substeps = epochs * (full * (ga - 1) + max(rest - 1, 0))
    if "max_steps" not in kw:
        assert events.count("on_substep_end") == expected_substeps
    assert events[0] == "on_init_end" and events[-1] == "on_predict"
    if kw.get("save_strategy") != "no":
        assert events.count("on_save") >= 1
    if kw.get("eval_on_start"):
        assert events.index("on_evaluate") < events.index("on_epoch_begin")


def test_timeline_check_is_not_vacuous():
    with pytest.raises(TimelineError):
        check_events(["on_init_end", "on_train_begin", "on_step_begin", "on_epoch_begin"])
