"""Input checks that catch, before the first step, data that would fail deep inside the model.

Token ids past the embedding table are a device-side assert on CUDA (or an index error naming no
field on CPU); a raw text item fails in the collator with a message about tensors. These checks
look at the first item and the first batch once, on the host. The token ids of every batch are
checked too (`check_step_batches`), while they are still on the CPU: one min and one max over
input_ids, a few microseconds per batch, and no device sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn


def check_dataset_items(dataset: Any, name: str) -> None:
    """An empty dataset, or items that are not feature dicts (None, raw text)."""
    try:
        size = len(dataset)
    except TypeError:
        return  # an iterable dataset: its items are seen in the first batch
    if size == 0:
        raise ValueError(f"`{name}` is empty (0 items); pass a dataset with at least one example.")
    try:
        first = dataset[0]
    except Exception:  # noqa: BLE001 - a dataset without integer indexing is checked at its first batch
        return
    if first is None or isinstance(first, str | bytes):
        what = "None" if first is None else f"a {type(first).__name__} ({str(first)[:40]!r})"
        raise TypeError(
            f"`{name}`[0] is {what}; items must be dicts of features such as input_ids and labels. "
            "Tokenize raw text first (e.g. dataset.map(tokenizer)) and drop empty rows."
        )


def check_step_batches(run: Any, model: nn.Module, micro_batches: list[Any]) -> None:
    """The micro-batches of the step about to run (`run` is the step's context, `engine.step.
    StepContext`): `check_first_batch` on the first one the run trains on (once), and the token ids
    of every one against the input embedding."""
    unwrapped = run.strategy.unwrap(model)
    if not run.first_batch_checked:
        check_first_batch(unwrapped, micro_batches[0], run.label_shift)
        run.first_batch_checked = True
    embeddings = _input_embeddings(unwrapped)
    if embeddings is None:
        return
    name = getattr(unwrapped, "main_input_name", "input_ids")
    rows = embeddings.num_embeddings
    for i, batch in enumerate(micro_batches):
        ids = batch.get(name) if isinstance(batch, dict) else None
        # Only where the ids are on the CPU: on a device the min/max would wait for it.
        if not isinstance(ids, torch.Tensor) or ids.device.type != "cpu":
            continue
        if not ids.numel() or ids.is_floating_point():
            continue
        low, high = torch.aminmax(ids)
        if low < 0 or high >= rows:
            bad = int(low) if low < 0 else int(high)
            raise ValueError(
                f"{name} of {_describe_batch(run, i)} holds token id {bad}, "
                f"outside the model's input embedding of {rows} rows (ids 0-{rows - 1}). The data "
                "was tokenized with another vocabulary, or a token was added without "
                "model.resize_token_embeddings(len(tokenizer)); fix that batch's source or the model."
            )


def _describe_batch(run: Any, index: int) -> str:
    """'micro-batch i of step S (epoch E, micro-batch k of the epoch)' for the step about to run."""
    progress = run.progress
    step = run.state.global_step + 1
    in_epoch = progress.step_in_epoch * run.args.gradient_accumulation_steps + index
    return f"micro-batch {index} of step {step} (epoch {progress.epoch}, micro-batch {in_epoch} of the epoch)"


def check_first_batch(model: nn.Module, batch: Any, label_shift: bool) -> None:
    """Token ids inside the embedding table; labels that fit the model's outputs."""
    if not isinstance(batch, dict):
        return
    ids = batch.get(getattr(model, "main_input_name", "input_ids"))
    embeddings = _input_embeddings(model)
    if (
        isinstance(ids, torch.Tensor)
        and embeddings is not None
        and ids.numel()
        and not ids.is_floating_point()
    ):
        rows = embeddings.num_embeddings
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= rows:
            raise ValueError(
                f"input_ids range from {low} to {high}, but the model's embedding has {rows} rows "
                f"(ids 0-{rows - 1}). The tokenizer does not match the model: use the model's own "
                "tokenizer, or call model.resize_token_embeddings(len(tokenizer)) after adding tokens."
            )
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and isinstance(ids, torch.Tensor) and labels.dim() and ids.dim():
        if labels.shape[0] != ids.shape[0]:
            raise ValueError(
                f"labels have {labels.shape[0]} rows but input_ids have {ids.shape[0]}: each example needs "
                "its own label; check the collator and the label column."
            )
        if label_shift and labels.shape != ids.shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but input_ids {tuple(ids.shape)}; a language "
                "model needs one label per token: pad labels like input_ids (with -100), e.g. with "
                "DataCollatorForLanguageModeling or DataCollatorForSeq2Seq."
            )
    _check_class_labels(model, labels, label_shift)


def _check_class_labels(model: nn.Module, labels: Any, label_shift: bool) -> None:
    """Single-label classification: a class index must be below config.num_labels."""
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if (
        label_shift
        or not isinstance(labels, torch.Tensor)
        or labels.dim() != 1
        or labels.is_floating_point()
        or not isinstance(num_labels, int)
        or getattr(config, "problem_type", None) not in (None, "single_label_classification")
        or num_labels <= 1
    ):
        return
    high = int(labels.max()) if labels.numel() else 0
    if high >= num_labels:
        raise ValueError(
            f"labels go up to {high}, but the model has num_labels={num_labels} "
            f"(classes 0-{num_labels - 1}); build the model with num_labels set to the number of "
            "classes, or map the labels to 0..n-1."
        )


def _input_embeddings(model: nn.Module) -> Any:
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        embeddings = get()
    except (NotImplementedError, AttributeError):
        return None
    return embeddings if isinstance(getattr(embeddings, "num_embeddings", None), int) else None


def check_scalar_loss(loss: torch.Tensor) -> None:
    """A loss of several values (per example, per token) cannot be backpropagated as one."""
    if loss.dim() > 0 and loss.numel() != 1:
        raise ValueError(
            f"The loss has shape {tuple(loss.shape)}, not a single number; reduce it in the model or in "
            "compute_loss / compute_loss_func (e.g. loss.mean(), or a sum divided by num_items_in_batch)."
        )
