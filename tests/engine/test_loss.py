"""Loss counting (`ember.engine.loss`): which positions a model's mean loss averages over, label
smoothing as a sum over targets, and which models shift their labels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember.engine.loss import IGNORE_INDEX, count_targets, loss_from_outputs, shifts_labels, smoothed_loss_sum
from tests.helpers import RegressionModel, tiny_gpt2


def test_integer_labels_count_positions_not_ignored_after_the_causal_shift():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX], [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX]])
    assert int(count_targets({"labels": labels}, shift=False)) == 4
    # Shifted: the first column is never a target (5 and the ignored one drop out).
    assert int(count_targets({"labels": labels}, shift=True)) == 3


def test_float_labels_count_every_element_and_no_labels_count_samples():
    assert int(count_targets({"labels": torch.zeros(3, 2)}, shift=True)) == 6
    assert int(count_targets({"input_x": torch.zeros(5, 7)}, shift=False)) == 5
    assert int(count_targets({"flag": True}, shift=False)) == 1


@pytest.mark.parametrize("shift", [False, True])
def test_smoothed_sum_over_targets_matches_torch_cross_entropy(shift):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 3] = IGNORE_INDEX
    total = smoothed_loss_sum(logits, labels, 0.1, shift)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    want = nn.functional.cross_entropy(
        logits.reshape(-1, 11), labels.reshape(-1), label_smoothing=0.1, reduction="sum"
    )
    assert float(total) == pytest.approx(float(want), rel=1e-6)


def test_which_models_shift_labels():
    assert shifts_labels(tiny_gpt2())
    assert not shifts_labels(RegressionModel())
    model = RegressionModel()
    model.shifts_labels = True  # a plain module may declare it
    assert shifts_labels(model)


def test_a_model_without_loss_is_an_error_that_names_the_labels():
    with pytest.raises(ValueError, match="label_names=\\['labels'\\]"):
        loss_from_outputs({"logits": torch.zeros(2)}, {"input_ids": torch.zeros(2)}, ["labels"])
    assert float(loss_from_outputs((torch.tensor(1.5), torch.zeros(2)), {}, ["labels"])) == 1.5


def test_shift_labels_are_counted_as_given():
    # Targets already aligned with the logits (context parallelism makes them): no second shift.
    batch = {"labels": torch.tensor([[1, 2, 3, 4]]), "shift_labels": torch.tensor([[2, 3, 4, -100]])}
    assert int(count_targets(batch, shift=True)) == 3
