"""The evaluation/prediction loop: batches in, metrics out, memory bounded by what is asked for.

Losses are summed as they come (no list of per-batch losses unless `include_for_metrics` asks for
them). Logits are kept only when needed for `compute_metrics` or `predict`, moved to CPU every
`eval_accumulation_steps` batches, and with `batch_eval_metrics` never kept at all: the metric is
updated batch by batch and memory stays flat in the dataset size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .outputs import EvalLoopOutput, EvalPrediction

if TYPE_CHECKING:
    from .trainer import Trainer

PAD_INDEX = -100


def _pad_to(t: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    if t.dim() <= dim or t.shape[dim] == length:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = length - t.shape[dim]
    return torch.cat([t, t.new_full(pad_shape, PAD_INDEX)], dim=dim)


def concat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, padding dim 1 with -100 where sequence lengths differ."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].dim() >= 2:
        longest = max(p.shape[1] for p in parts)
        parts = [_pad_to(p, longest) for p in parts]
    return torch.cat(parts, dim=0)


class _Accumulator:
    """Collects tensors (or tuples of tensors) batch by batch; offloads to CPU every `every` batches."""

    def __init__(self, every: int | None) -> None:
        self.every = every
        self.device_parts: list[Any] = []
        self.cpu_parts: list[Any] = []

    def add(self, value: Any) -> None:
        if value is None:
            return
        self.device_parts.append(value)
        if self.every and len(self.device_parts) >= self.every:
            self.offload()

    def offload(self) -> None:
        if self.device_parts:
            self.cpu_parts.append(_map(lambda *ts: concat_padded(list(ts)).cpu(), *self.device_parts))
            self.device_parts = []

    def result(self) -> Any:
        self.offload()
        if not self.cpu_parts:
            return None
        return _map(lambda *ts: _numpy(concat_padded(list(ts))), *self.cpu_parts)


def _map(fn: Callable[..., Any], *values: Any) -> Any:
    """Apply `fn` across parallel nested tuples/lists of tensors (logits may be a tuple)."""
    first = values[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_map(fn, *inner) for inner in zip(*values))
    if isinstance(first, Mapping):
        return {k: _map(fn, *(v[k] for v in values)) for k in first}
    return fn(*values)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """`t` as a numpy array; dtypes numpy lacks (bfloat16, float8) become float32 first."""
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


def evaluation_loop(
    trainer: Trainer,
    dataloader: Iterable[dict[str, Any]],
    description: str,
    prediction_loss_only: bool | None = None,
    ignore_keys: list[str] | None = None,
    metric_key_prefix: str = "eval",
) -> EvalLoopOutput:
    args, strategy = trainer.args, trainer.strategy
    loss_only = args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
    want_inputs = "inputs" in args.include_for_metrics
    want_losses = "loss" in args.include_for_metrics
    batch_metrics = args.batch_eval_metrics and trainer.compute_metrics is not None
    model = trainer.model_for_eval()
    model.eval()

    preds, labels, inputs_acc, losses_acc = (_Accumulator(args.eval_accumulation_steps) for _ in range(4))
    # [sum of all losses, sum of finite losses, samples with a finite loss], each sample-weighted.
    loss_sums = torch.zeros(3, dtype=torch.float64, device=strategy.device)
    num_samples = 0
    metrics: dict[str, Any] = {}
    has_loss = False
    # Several ranks: batches from `padding_from` on only even out the ranks' batch counts; gathered
    # rows beyond the dataset size are their copies and are cut (see distributed/sampling.py).
    sampler = getattr(dataloader, "batch_sampler", None)
    padding_from = getattr(sampler, "padding_from", None)
    rows_left = getattr(sampler, "num_samples", None) if padding_from is not None else None
    for step, (is_last, batch) in enumerate(_with_last(dataloader)):
        batch_size = _batch_size(batch)
        padding = padding_from is not None and step >= padding_from
        loss, logits, batch_labels = trainer.prediction_step(model, batch, loss_only, ignore_keys)
        if loss is not None:
            # transformers weights each batch's mean loss by its sample count; so do we.
            if not padding:
                weighted = loss.detach().double() * batch_size
                finite = torch.isfinite(weighted)
                loss_sums += torch.stack(
                    [weighted, torch.where(finite, weighted, 0.0), finite.double() * batch_size]
                )
            has_loss = True
        num_samples += 0 if padding else batch_size
        outputs, rows_left = _gathered(
            strategy,
            (
                logits,
                batch_labels,
                batch.get("input_ids") if want_inputs else None,
                loss.detach().reshape(1).repeat(batch_size) if want_losses and loss is not None else None,
            ),
            rows_left,
        )
        logits, batch_labels, batch_inputs, batch_losses = outputs
        if logits is not None and trainer.preprocess_logits_for_metrics is not None:
            logits = trainer.preprocess_logits_for_metrics(logits, batch_labels)
        outputs = (logits, batch_labels, batch_inputs, batch_losses)
        if batch_metrics:
            # As transformers: the batch's tensors as they are (torch metric code runs on them), and
            # `inputs` is the whole batch; no call for a batch without logits or labels.
            if logits is not None and batch_labels is not None:
                pred = EvalPrediction(
                    logits,
                    batch_labels,
                    batch if want_inputs else None,
                    batch_losses if want_losses else None,
                )
                metrics = trainer.compute_metrics(pred, compute_result=is_last)  # type: ignore[misc,call-arg]
        elif not loss_only:
            for acc, value in zip((preds, labels, inputs_acc, losses_acc), outputs):
                acc.add(value)
        trainer.control = trainer.callback_handler.on_prediction_step(args, trainer.state, trainer.control)

    all_preds, all_labels = preds.result(), labels.result()
    if (
        trainer.compute_metrics is not None
        and not batch_metrics
        and all_preds is not None
        and all_labels is not None
    ):
        pred = EvalPrediction(all_preds, all_labels, inputs_acc.result(), losses_acc.result())
        metrics = trainer.compute_metrics(pred)
    num_samples = int(strategy.all_reduce_sum(torch.tensor(num_samples, device=strategy.device)))
    mean_loss = _mean_loss(strategy.all_reduce_sum(loss_sums), num_samples, args.logging_nan_inf_filter)
    mean_loss = mean_loss if has_loss else None
    metrics = _prefixed(metrics, mean_loss, metric_key_prefix)
    return EvalLoopOutput(all_preds, all_labels, metrics, num_samples)


def _mean_loss(sums: torch.Tensor, num_samples: int, filter_nan_inf: bool) -> float | None:
    """The sample-weighted mean loss; with the NaN/inf filter, over the finite batches only
    (when there is one), as transformers computes `eval_loss`."""
    total, finite_total, finite_samples = (float(x) for x in sums)
    if filter_nan_inf and finite_samples > 0:
        return finite_total / finite_samples
    return total / num_samples if num_samples else None


def _gathered(
    strategy: Any, values: tuple[Any, ...], rows_left: int | None
) -> tuple[tuple[Any, ...], int | None]:
    """Gather a batch's outputs from every rank; cut the rows that only pad the last batches."""
    values = tuple(_gather(strategy, v) for v in values)
    rows = _rows(*values)
    if rows_left is not None and rows >= 0:
        keep = min(rows, rows_left)
        rows_left -= keep
        values = tuple(_first_rows(v, keep) for v in values)
    return values, rows_left


def _prefixed(metrics: dict[str, Any] | None, loss: float | None, prefix: str) -> dict[str, Any]:
    """Plain numbers, the mean loss, and every key under `prefix_` as transformers names them."""
    out = {
        k: (v.item() if isinstance(v, (np.generic, torch.Tensor)) else v) for k, v in (metrics or {}).items()
    }
    if loss is not None:
        out["loss"] = loss
    return {(k if k.startswith(f"{prefix}_") else f"{prefix}_{k}"): v for k, v in out.items()}


def _with_last(iterable: Iterable[Any]) -> Iterable[tuple[bool, Any]]:
    """Yield (is_last, item) with one item of lookahead, so streaming metrics know the final batch."""
    it = iter(iterable)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield False, current
        current = following
    yield True, current


def _gather(strategy: Any, value: Any) -> Any:
    if value is None or strategy.world_size == 1:
        return value
    return _map(strategy.gather_padded, value)


def _rows(*values: Any) -> int:
    """Length of dim 0 of the first tensor found in `values` (nested tuples/dicts allowed)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() else 1
        if isinstance(value, Mapping):
            value = list(value.values())
        if isinstance(value, (tuple, list)) and value:
            rows = _rows(*value)
            if rows >= 0:
                return rows
    return -1


def _first_rows(value: Any, n: int) -> Any:
    return None if value is None else _map(lambda t: t[:n] if t.dim() else t, value)


def _batch_size(batch: Any) -> int:
    for value in batch.values() if isinstance(batch, Mapping) else batch:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    return 1


def speed_metrics(
    prefix: str,
    start: float,
    num_samples: int | None = None,
    num_steps: int | None = None,
    num_tokens: int | None = None,
) -> dict[str, float]:
    """`{prefix}_runtime` and per-second rates, as transformers names them."""
    runtime = time.perf_counter() - start
    out = {f"{prefix}_runtime": round(runtime, 4)}
    if runtime <= 0:
        return out
    if num_samples is not None:
        out[f"{prefix}_samples_per_second"] = round(num_samples / runtime, 3)
    if num_steps is not None:
        out[f"{prefix}_steps_per_second"] = round(num_steps / runtime, 3)
    if num_tokens is not None:
        out[f"{prefix}_tokens_per_second"] = round(num_tokens / runtime, 3)
    return out


def labels_of(inputs: dict[str, Any], names: list[str]) -> Any:
    labels = tuple(inputs[k] for k in names)
    return labels[0] if len(labels) == 1 else labels


def ignore_keys_at_inference(model: nn.Module) -> list[str]:
    config = getattr(model, "config", None)
    return list(getattr(config, "keys_to_ignore_at_inference", []) or [])


def _is_tensors(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_tensors(v) for v in value)
    return isinstance(value, torch.Tensor)


def logits_without(outputs: Any, ignore: list[str]) -> Any:
    if isinstance(outputs, Mapping):
        # Caches (past_key_values) and other non-tensors are not predictions.
        values = tuple(v for k, v in outputs.items() if k not in ignore and k != "loss" and _is_tensors(v))
    elif isinstance(outputs, (tuple, list)):
        values = tuple(outputs)
        if values and isinstance(values[0], torch.Tensor) and values[0].dim() == 0:
            values = values[1:]
    else:
        values = (outputs,)
    return values[0] if len(values) == 1 else values
