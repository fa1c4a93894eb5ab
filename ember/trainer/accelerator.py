"""`trainer.accelerator`: the members of accelerate's `Accelerator` that Trainer subclasses call,
answered by ember's strategy and precision (accelerate itself is not needed).

Code written for transformers' Trainer reaches for `self.accelerator.backward(loss)`,
`.gather_for_metrics(...)`, `.is_main_process` and so on. Each member here means what it means in
accelerate, in ember's terms:

- `backward(loss)` scales the loss for fp16 and runs the strategy's backward; like transformers'
  own accelerator (whose accumulation count is 1), it does not divide by the accumulation steps:
  the loss a `training_step` gets from `compute_loss(..., num_items_in_batch=...)` is already its
  exact share of the step (sum of target losses / targets of the whole step on all ranks).
- the collectives go through the strategy, so they are the identity on one process.
- `sync_gradients` is False for the micro-batches whose gradients are kept local (all but the last
  one of an optimizer step), True otherwise, as accelerate's gradient state says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..args.accelerator_config import accelerator_config_of

if TYPE_CHECKING:
    from ..strategy.base import Strategy


class EmberAccelerator:
    """The accelerate-shaped view of one Trainer's strategy; `trainer.accelerator` returns it."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer

    @property
    def _strategy(self) -> Strategy:
        strategy: Strategy = self._trainer.strategy
        return strategy

    # -- who and where -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._strategy.device

    @property
    def process_index(self) -> int:
        return self._strategy.rank

    @property
    def local_process_index(self) -> int:
        return self._strategy.local_rank

    @property
    def num_processes(self) -> int:
        return self._strategy.world_size

    @property
    def is_main_process(self) -> bool:
        return self._strategy.is_main

    @property
    def is_local_main_process(self) -> bool:
        return self._strategy.is_local_main

    @property
    def use_distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def distributed_type(self) -> str:
        """accelerate's `DistributedType` value as a string; accelerate's enum is a `str` enum, so
        `accelerator.distributed_type == DistributedType.DEEPSPEED` compares as in transformers."""
        if self._trainer.is_deepspeed_enabled:
            return "DEEPSPEED"
        if self._trainer.is_fsdp_enabled:
            return "FSDP"
        if self.num_processes > 1:
            return "MULTI_GPU" if self.device.type == "cuda" else "MULTI_CPU"
        return "NO"

    @property
    def mixed_precision(self) -> str:
        name = self._trainer.precision.name
        return name if name in ("fp16", "bf16") else "no"

    # -- training --------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backward of `loss` through the strategy, fp16-scaled when the run uses a loss scaler.

        accelerate's keyword arguments (`scale_wrt_gas`, LOMO's `learning_rate`) have no role here:
        ember never rescales for accumulation and does not run LOMO optimizers.
        """
        trainer = self._trainer
        self._strategy.backward(trainer.precision.scale(loss), trainer.model_wrapped)

    @property
    def sync_gradients(self) -> bool:
        run = self._trainer.run
        return run is None or run.step_parts.sync_gradients

    @property
    def gradient_accumulation_steps(self) -> int:
        # transformers builds its Accelerator with an accumulation count of 1 and normalises the
        # loss itself, so its subclasses see 1 here; so do ember's.
        return 1

    # -- the data options of TrainingArguments.accelerator_config, as accelerate reports them ------------
    @property
    def split_batches(self) -> bool:
        return accelerator_config_of(self._trainer.args).split_batches

    @property
    def even_batches(self) -> bool:
        return accelerator_config_of(self._trainer.args).even_batches

    @property
    def use_seedable_sampler(self) -> bool:
        return accelerator_config_of(self._trainer.args).use_seedable_sampler

    @property
    def non_blocking(self) -> bool:
        return accelerator_config_of(self._trainer.args).non_blocking

    @property
    def optimizer_step_was_skipped(self) -> bool:
        return bool(self._trainer.precision.step_was_skipped())

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Unscale fp16 gradients, then clip; the whole model's parameters are clipped by the
        strategy (a sharded model's norm is the global one)."""
        trainer = self._trainer
        if trainer.optimizer is not None:
            trainer.precision.unscale_(trainer.optimizer)
        params = list(parameters) if not isinstance(parameters, torch.Tensor) else [parameters]
        model = trainer.model_wrapped
        if norm_type == 2.0 and {id(p) for p in params} == {id(p) for p in model.parameters()}:
            return self._strategy.clip_grad_norm(model, max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)

    def clip_grad_value_(self, parameters: Any, clip_value: float) -> None:
        trainer = self._trainer
        if trainer.optimizer is not None:
            trainer.precision.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_value_(parameters, clip_value)

    @contextlib.contextmanager
    def autocast(self, autocast_handler: Any = None) -> Iterator[None]:
        with self._trainer.precision.autocast():
            yield

    def unwrap_model(
        self, model: nn.Module, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True
    ) -> nn.Module:
        inner = self._strategy.unwrap(model)
        if not keep_torch_compile:
            inner = getattr(inner, "_orig_mod", inner)
        return inner

    # -- collectives -----------------------------------------------------------------------------------
    def gather(self, tensor: Any) -> Any:
        """Every rank's `tensor` (or nested list/tuple/dict of tensors), concatenated on dim 0."""
        return _map_tensors(self._strategy.gather, tensor)

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        """`gather`, or for Python objects (and with `use_gather_object`) a flat list of every
        rank's items. ember's samplers pad the last evaluation batches and its evaluation loop
        cuts those rows; this member, called from a custom loop, gathers what it is given."""
        tensors_only = _all_tensors(input_data)
        if use_gather_object or not tensors_only:
            return self.gather_object(input_data)
        return self.gather(input_data)

    def gather_object(self, obj: Any) -> list[Any]:
        """A list of every rank's `obj` (a list's items are concatenated), as accelerate's
        `gather_object`."""
        parts = self._strategy.gather_object(obj)
        if isinstance(obj, list | tuple):
            return [item for part in parts for item in part]
        return list(parts)

    def reduce(self, tensor: Any, reduction: str = "sum", scale: float = 1.0) -> Any:
        if reduction not in ("sum", "mean", "none"):
            raise ValueError(f"reduce: reduction must be 'sum', 'mean' or 'none', not {reduction!r}.")

        def one(t: torch.Tensor) -> torch.Tensor:
            if reduction == "none":
                return t * scale if scale != 1.0 else t
            # all_reduce_sum runs over the data-parallel ranks (under tensor parallelism the ranks of
            # one TP group hold the same value), so the mean divides by their number.
            out = self._strategy.all_reduce_sum(t.clone() * scale)
            return out / self._strategy.dp_world_size if reduction == "mean" else out

        return _map_tensors(one, tensor)

    def pad_across_processes(
        self, tensor: Any, dim: int = 0, pad_index: int = 0, pad_first: bool = False
    ) -> Any:
        """`tensor` padded with `pad_index` along `dim` to the largest size on any rank."""

        def one(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 0 or dim >= t.dim():
                return t
            size = torch.tensor([t.shape[dim]], dtype=torch.int64, device=t.device)
            longest = int(self._strategy.gather(size).max())
            if longest == t.shape[dim]:
                return t
            pad_shape = list(t.shape)
            pad_shape[dim] = longest - t.shape[dim]
            pad = t.new_full(pad_shape, pad_index)
            return torch.cat([pad, t] if pad_first else [t, pad], dim=dim)

        return _map_tensors(one, tensor)

    def wait_for_everyone(self) -> None:
        self._strategy.barrier()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """`print` on the local main process only."""
        if self.is_local_main_process:
            print(*args, **kwargs)

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """The main process runs the block first (a download, a cache write); the others wait."""
        with self._first(self.is_main_process):
            yield

    @contextlib.contextmanager
    def local_main_process_first(self) -> Iterator[None]:
        with self._first(self.is_local_main_process):
            yield

    @contextlib.contextmanager
    def _first(self, leader: bool) -> Iterator[None]:
        if not leader:
            self.wait_for_everyone()
        yield
        if leader:
            self.wait_for_everyone()

    @contextlib.contextmanager
    def split_between_processes(self, inputs: Any, apply_padding: bool = False) -> Iterator[Any]:
        """This process's contiguous share of `inputs` (list, tuple, tensor, or a dict of them);
        the first `len % num_processes` ranks get one item more, and with `apply_padding` the
        shorter shares repeat their last item so every rank gets as many."""
        yield _split(inputs, self.process_index, self.num_processes, apply_padding)

    # -- accelerate's stateful calls that have nothing to do here ---------------------------------------
    def free_memory(self, *objects: Any) -> list[Any]:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return list(objects)


def _all_tensors(data: Any) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, Mapping):
        return all(_all_tensors(v) for v in data.values())
    if isinstance(data, list | tuple):
        return all(_all_tensors(v) for v in data)
    return False


def _map_tensors(fn: Callable[[torch.Tensor], Any], data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        return type(data)({k: _map_tensors(fn, v) for k, v in data.items()})  # type: ignore[call-arg]
    if isinstance(data, list | tuple):
        return type(data)(_map_tensors(fn, v) for v in data)
    raise TypeError(
        f"expected a tensor or a nested list/tuple/dict of tensors, got {type(data).__name__}; "
        "use gather_for_metrics(..., use_gather_object=True) for Python objects."
    )


def _split(inputs: Any, rank: int, world: int, pad: bool) -> Any:
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _split(v, rank, world, pad) for k, v in inputs.items()})  # type: ignore[call-arg]
    length = len(inputs)
    per, extra = divmod(length, world)
    start = rank * per + min(rank, extra)
    end = start + per + (1 if rank < extra else 0)
    share = inputs[start:end]
    if pad and extra and rank >= extra and length:
        last = inputs[end - 1 : end] if end > start else inputs[-1:]
        if isinstance(share, torch.Tensor):
            share = torch.cat([share, last], dim=0)
        else:
            share = share + last
    return share
