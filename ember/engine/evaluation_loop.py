"""The evaluation/prediction loop: batches in, metrics out, memory bounded by what is asked for.

Losses are summed as they come (no list of per-batch losses unless `include_for_metrics` asks for
them). Logits are kept only when needed for `compute_metrics` or `predict`, moved to CPU every
`eval_accumulation_steps` batches, and with `batch_eval_metrics` never kept at all: the metric is
updated batch by batch and memory stays flat in the dataset size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from ..args.accelerator_config import accelerator_config_of
from ..outputs import EvalLoopOutput, EvalPrediction
from ..utils import batch_rows
from .checks import checked_metrics
from .loss import IGNORE_INDEX

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..callbacks.state import TrainerControl, TrainerState
    from ..strategy.base import Strategy


class EvalHost(Protocol):
    """What the evaluation loop needs from its owner (the Trainer is one)."""

    args: TrainingArguments
    state: TrainerState
    control: TrainerControl
    strategy: Strategy
    compute_metrics: Callable[..., Any] | None
    preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None

    def model_for_eval(self) -> nn.Module: ...

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]: ...

    def _fire(self, event: str, **kwargs: Any) -> None: ...


def _pad_to(t: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    if t.dim() <= dim or t.shape[dim] == length:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = length - t.shape[dim]
    return torch.cat([t, t.new_full(pad_shape, IGNORE_INDEX)], dim=dim)


def concat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, padding dim 1 with -100 where sequence lengths differ."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].dim() >= 2:
        longest = max(p.shape[1] for p in parts)
        parts = [_pad_to(p, longest) for p in parts]
    return torch.cat(parts, dim=0)


class GatheredObjects(list):  # type: ignore[type-arg]
    """Python objects of every rank's batch (`eval_use_gather_object`): one leaf to the evaluation
    loop, whose batches are concatenated as lists, not tensors."""


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], GatheredObjects):
        return GatheredObjects(item for part in parts for item in part)
    return concat_padded(parts)


def _to_host(value: Any) -> Any:
    return list(value) if isinstance(value, GatheredObjects) else _numpy(value)


class _Accumulator:
    """Collects tensors (or tuples of tensors) batch by batch; offloads to CPU every `every` batches.

    With `concat=False` (`eval_do_concat_batches=False`) the result is the list of the batches'
    outputs, each as it came (sequence lengths may differ), as transformers returns them.
    """

    def __init__(self, every: int | None, concat: bool = True) -> None:
        self.every = every
        self.concat = concat
        self.device_parts: list[Any] = []
        self.cpu_parts: list[Any] = []

    def add(self, value: Any) -> None:
        if value is None:
            return
        if not self.concat:
            self.cpu_parts.append(_map(_to_host, value))
            return
        self.device_parts.append(value)
        if self.every and len(self.device_parts) >= self.every:
            self.offload()

    def offload(self) -> None:
        if self.device_parts:
            self.cpu_parts.append(_map(lambda *ts: _cpu(_concat(list(ts))), *self.device_parts))
            self.device_parts = []

    def result(self) -> Any:
        self.offload()
        if not self.cpu_parts:
            return None
        if not self.concat:
            return list(self.cpu_parts)
        return _map(lambda *ts: _to_host(_concat(list(ts))), *self.cpu_parts)


def _cpu(value: Any) -> Any:
    return value if isinstance(value, GatheredObjects) else value.cpu()


def _map(fn: Callable[..., Any], *values: Any) -> Any:
    """Apply `fn` across parallel nested tuples/lists of tensors (logits may be a tuple)."""
    first = values[0]
    if isinstance(first, GatheredObjects):
        return fn(*values)
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


class _LossSums:
    """Sample-weighted loss sums of the batches seen: all, finite only, and the finite batches'
    samples (for the NaN/inf filter), kept on the device until the end."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.seen = False

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        # transformers weights each batch's mean loss by its sample count; so do we.
        weighted = loss.detach().double() * batch_size
        finite = torch.isfinite(weighted)
        self.sums += torch.stack([weighted, torch.where(finite, weighted, 0.0), finite.double() * batch_size])


def evaluation_loop(
    host: EvalHost,
    dataloader: Iterable[dict[str, Any]],
    description: str,
    prediction_loss_only: bool | None = None,
    ignore_keys: list[str] | None = None,
    metric_key_prefix: str = "eval",
) -> EvalLoopOutput:
    args, strategy = host.args, host.strategy
    loss_only = args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
    want_inputs = "inputs" in args.include_for_metrics
    want_losses = "loss" in args.include_for_metrics
    batch_metrics = args.batch_eval_metrics and host.compute_metrics is not None
    model = host.model_for_eval()
    model.eval()

    accumulators = tuple(
        _Accumulator(args.eval_accumulation_steps, args.eval_do_concat_batches) for _ in range(4)
    )
    loss_sums = _LossSums(strategy.device)
    num_samples = 0
    metrics: dict[str, Any] = {}
    # Several ranks: batches from `padding_from` on only even out the ranks' batch counts; gathered
    # rows beyond the dataset size are their copies and are cut (see data/sharding.py).
    sampler = getattr(dataloader, "batch_sampler", None)
    padding_from = getattr(sampler, "padding_from", None)
    rows_left = getattr(sampler, "num_samples", None) if padding_from is not None else None
    # even_batches=False: ranks may run out of batches before the others (no padding copies).
    joined = _Joined(strategy, dataloader) if _uneven(args, strategy) else None
    steps = joined if joined is not None else _with_last(dataloader)
    for step, (is_last, batch) in enumerate(steps):
        local: tuple[Any, ...] | None = None
        if batch is not None:
            batch_size = batch_rows(batch) or 1
            padding = padding_from is not None and step >= padding_from
            loss, logits, batch_labels = host.prediction_step(model, batch, loss_only, ignore_keys)
            if loss is not None:
                loss_sums.seen = True
                if not padding:
                    loss_sums.add(loss, batch_size)
            num_samples += 0 if padding else batch_size
            batch_losses = (
                loss.detach().reshape(1).repeat(batch_size) if want_losses and loss is not None else None
            )
            local = (logits, batch_labels, batch.get("input_ids") if want_inputs else None, batch_losses)
        elif joined is not None and strategy.shards_parameters:
            # Sharded parameters: every forward gathers them from all ranks, so a rank out of batches
            # runs its last batch again (outputs dropped) for the others' forward to complete.
            host.prediction_step(model, joined.last_batch, loss_only, ignore_keys)
        if joined is not None:
            local = joined.rows_or_none(local)
        assert local is not None
        outputs, rows_left = _gathered(strategy, local, rows_left, args.eval_use_gather_object)
        if outputs[0] is not None and host.preprocess_logits_for_metrics is not None:
            outputs = (host.preprocess_logits_for_metrics(outputs[0], outputs[1]), *outputs[1:])
        if batch_metrics:
            metrics = _batch_metrics(host, outputs, batch if batch is not None else {}, is_last) or metrics
        # predict() returns its predictions whatever the metrics do (as transformers); evaluate()
        # with batch_eval_metrics keeps nothing, which is what the option is for.
        if not loss_only and (not batch_metrics or description == "Prediction"):
            for acc, value in zip(accumulators, outputs):
                acc.add(value)
        if batch is not None:
            host._fire("on_prediction_step")
    if joined is not None:  # a rank without batches reports the loss the others computed
        loss_sums.seen = strategy.any_rank(loss_sums.seen)
    return _finish(host, accumulators, batch_metrics, metrics, loss_sums, num_samples, metric_key_prefix)


def _uneven(args: TrainingArguments, strategy: Strategy) -> bool:
    return strategy.dp_world_size > 1 and not accelerator_config_of(args).even_batches


class _Joined:
    """The batches of a rank under even_batches=False, joined step by step with the other ranks'.

    Each step the ranks agree (one all-reduce of three counts) whether any still has a batch, whether
    any will have one after this step (so `is_last` is the same everywhere, as batch metrics need),
    and whether a rank without a batch lacks the shape of the outputs. A rank out of batches still
    takes part in each gather, with zero rows shaped like the outputs (of its own earlier batch, or
    described by the ranks that have one), so the gathered rows are exactly the dataset's, in order.
    """

    def __init__(self, strategy: Strategy, dataloader: Iterable[dict[str, Any]]) -> None:
        self.strategy, self.batches = strategy, _with_last(dataloader)
        self.template: Any = None
        self.need_template = False
        self.last_batch: dict[str, Any] = {}

    def __iter__(self) -> Iterator[tuple[bool, dict[str, Any] | None]]:
        while True:
            item = next(iter(self.batches), None)
            has = item is not None
            has_next = item is not None and not item[0]
            need = not has and self.template is None
            counts = self.strategy.all_reduce_sum(
                torch.tensor([has, has_next, need], dtype=torch.int64, device=self.strategy.device)
            ).tolist()
            if counts[0] == 0:
                return
            self.need_template = counts[2] > 0
            if self.need_template and self.strategy.shards_parameters:
                raise ValueError(
                    "accelerator_config['even_batches']=False: a rank has no evaluation batch at all, and "
                    "with sharded parameters (FSDP, ZeRO-3) every rank must run every forward. Use an "
                    "evaluation set of at least one batch per rank, a smaller per_device_eval_batch_size, "
                    "or even_batches=True."
                )
            if item is not None:
                self.last_batch = item[1]
            yield counts[1] == 0, (item[1] if item is not None else None)

    def rows_or_none(self, local: tuple[Any, ...] | None) -> tuple[Any, ...]:
        """This rank's outputs of the step, or zero rows shaped like them when it has no batch."""
        if self.need_template:
            mine = [_describe(v) for v in local] if local is not None else None
            shapes = self.strategy.gather_object(mine)
            if self.template is None:
                self.template = next(d for d in shapes if d is not None)
        if local is not None:
            if self.template is None:
                self.template = [_describe(v) for v in local]
            return local
        return tuple(_no_rows(d, self.strategy.device) for d in self.template)


def _describe(value: Any) -> Any:
    """The structure of one output: ("tensor", dtype, dims), ("seq"/"map", parts), or ("objects",)
    for Python values gathered as objects; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, max(value.dim(), 1))
    if not _all_tensors(value):
        return ("objects",)
    if isinstance(value, Mapping):
        return ("map", {k: _describe(v) for k, v in value.items()})
    return ("seq", [_describe(v) for v in value])


def _no_rows(shape: Any, device: torch.device) -> Any:
    """Zero rows of an output described by `_describe`."""
    if shape is None:
        return None
    kind = shape[0]
    if kind == "tensor":
        return torch.empty((0,) * shape[2], dtype=shape[1], device=device)
    if kind == "map":
        return {k: _no_rows(v, device) for k, v in shape[1].items()}
    if kind == "seq":
        return tuple(_no_rows(v, device) for v in shape[1])
    return []


def _batch_metrics(
    host: EvalHost, outputs: tuple[Any, ...], batch: Any, is_last: bool
) -> dict[str, Any] | None:
    """As transformers: the batch's tensors as they are (torch metric code runs on them), and
    `inputs` is the whole batch; no call for a batch without logits or labels."""
    logits, labels, _, losses = outputs
    if logits is None or labels is None:
        return None
    want = host.args.include_for_metrics
    pred = EvalPrediction(
        logits, labels, batch if "inputs" in want else None, losses if "loss" in want else None
    )
    metrics = host.compute_metrics(pred, compute_result=is_last)  # type: ignore[misc]
    return checked_metrics(metrics) if is_last else metrics  # earlier calls only accumulate


def _finish(
    host: EvalHost,
    accumulators: tuple[_Accumulator, ...],
    batch_metrics: bool,
    metrics: dict[str, Any],
    loss_sums: _LossSums,
    num_samples: int,
    prefix: str,
) -> EvalLoopOutput:
    """Metrics over everything kept, and the mean loss over every rank's samples."""
    preds, labels, inputs, losses = accumulators
    all_preds, all_labels = preds.result(), labels.result()
    if (
        host.compute_metrics is not None
        and not batch_metrics
        and all_preds is not None
        and all_labels is not None
    ):
        metrics = checked_metrics(
            host.compute_metrics(EvalPrediction(all_preds, all_labels, inputs.result(), losses.result()))
        )
    strategy = host.strategy
    num_samples = int(strategy.all_reduce_sum(torch.tensor(num_samples, device=strategy.device)))
    mean_loss = _mean_loss(
        strategy.all_reduce_sum(loss_sums.sums), num_samples, host.args.logging_nan_inf_filter
    )
    metrics = _prefixed(metrics, mean_loss if loss_sums.seen else None, prefix)
    return EvalLoopOutput(all_preds, all_labels, metrics, num_samples)


def _mean_loss(sums: torch.Tensor, num_samples: int, filter_nan_inf: bool) -> float | None:
    """The sample-weighted mean loss; with the NaN/inf filter, over the finite batches only
    (when there is one), as transformers computes `eval_loss`."""
    total, finite_total, finite_samples = (float(x) for x in sums)
    if filter_nan_inf and finite_samples > 0:
        return finite_total / finite_samples
    return total / num_samples if num_samples else None


def _gathered(
    strategy: Strategy, values: tuple[Any, ...], rows_left: int | None, objects: bool = False
) -> tuple[tuple[Any, ...], int | None]:
    """Gather a batch's outputs from every rank; cut the rows that only pad the last batches.

    With `objects` (`eval_use_gather_object`), outputs that are not tensors (strings, lists of
    Python values a custom prediction_step returns) are gathered as objects, in rank order."""
    values = tuple(_gather(strategy, v, objects) for v in values)
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


def _gather(strategy: Strategy, value: Any, objects: bool = False) -> Any:
    if value is None:
        return None
    if objects and not _all_tensors(value):
        parts = strategy.gather_object(value)
        if isinstance(value, (list, tuple)):
            return GatheredObjects(item for part in parts for item in part)
        return GatheredObjects(parts)
    return _map(strategy.gather, value)


def _all_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return all(_all_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        # An empty list is a rank's share of Python objects with no rows (even_batches=False).
        return bool(value) and all(_all_tensors(v) for v in value)
    return False


def _rows(*values: Any) -> int:
    """Length of dim 0 of the first tensor found in `values` (nested tuples/dicts allowed)."""
    for value in values:
        if isinstance(value, GatheredObjects):
            return len(value)
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
    def first(t: Any) -> Any:
        if isinstance(t, GatheredObjects):
            return GatheredObjects(t[:n])
        return t[:n] if t.dim() else t

    return None if value is None else _map(first, value)


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
