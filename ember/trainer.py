"""The Trainer: builds its parts from the arguments, then runs train / evaluate / predict.

`train()` reads top to bottom; the work of one optimizer step lives in `loop.py`, the evaluation
loop in `evaluation.py`, placement and collectives in the strategy (`distributed/`), dtype handling
in the precision object. The trainer never asks which backend or precision it runs with.
Members outside training are mixed in: evaluate / predict (`trainer_eval.py`), log and FLOPs
(`trainer_logging.py`), and the small ones scripts call (`trainer_surface.py`).
"""

from __future__ import annotations

import inspect
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from . import checks, loop
from .args import TrainingArguments, check_eval_dataset
from .batch_size import MicroBatchSplit
from .callbacks import CallbackHandler, TrainerCallback, build_callbacks
from .checkpoint.writer import CheckpointWriter
from .cpu_malloc import keep_heap_between_steps
from .data import (
    build_train_dataloader,
    is_iterable_dataset,
    make_train_batch_sampler,
    pick_collator,
    remove_unused_columns,
)
from .data.checks import check_dataset_items, check_scalar_loss
from .data.columns import default_label_names
from .distributed import build_strategy
from .evaluation import speed_metrics
from .guards import StepGuard
from .loss import count_targets, logits_of, loss_from_outputs, shifts_labels, smoothed_loss_sum
from .memory import MemoryTracker
from .models.neftune import neftune_noise
from .models.pipeline import label_smoothing_for, prepare_model
from .optim import build_optimizer, build_optimizer_from_cls, build_scheduler
from .outputs import TrainOutput
from .precision import Precision
from .preemption import PreemptionWatcher, TrainingPreempted
from .progress import LossTracker, RunProgress, TrainPlan, plan_steps
from .state import CallbackStates, TrainerControl, TrainerState
from .throughput import Throughput, device_peak_flops, model_flops_per_token
from .trainer_eval import TrainerEvaluation
from .trainer_logging import TrainerLogging
from .trainer_surface import TrainerSurface
from .utils import enable_full_determinism, set_seed, to_device

if TYPE_CHECKING:
    from .checkpoint.training import Parts

logger = logging.getLogger("ember")


class Trainer(TrainerEvaluation, TrainerLogging, TrainerSurface):
    """Drop-in for `transformers.Trainer`: same constructor, same methods, same callbacks."""

    #: Signals that make train() checkpoint at the end of the current step and exit; add
    #: `signal.SIGUSR1` for schedulers that warn with it.
    preemption_signals: tuple[int, ...] = (signal.SIGTERM,)

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable[[list[Any]], dict[str, Any]] | None = None,
        train_dataset: Dataset[Any] | IterableDataset[Any] | Any | None = None,
        eval_dataset: Dataset[Any] | dict[str, Dataset[Any]] | Any | None = None,
        processing_class: Any = None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_loss_func: Callable[..., torch.Tensor] | None = None,
        compute_metrics: Callable[..., dict[str, float]] | None = None,
        callbacks: list[TrainerCallback | type[TrainerCallback]] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.args = args if args is not None else TrainingArguments()
        checks.check_trainer_inputs(model, model_init, optimizers, optimizer_cls_and_kwargs)
        check_eval_dataset(self.args, eval_dataset is not None)
        self.strategy = build_strategy(self.args)
        self._seed_everything()
        self.model_init = model_init
        self.model: nn.Module = model if model is not None else self.call_model_init()
        self.model_wrapped: nn.Module = self.model
        self.processing_class = processing_class
        self.data_collator = data_collator if data_collator is not None else pick_collator(processing_class)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_loss_func, self.compute_metrics = compute_loss_func, compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.label_shift = shifts_labels(self.model)
        self._label_smoothing = label_smoothing_for(self.model, self.args.label_smoothing_factor)
        self.label_names = self.args.label_names or default_label_names(self.model)
        self.state = TrainerState(
            is_local_process_zero=self.strategy.is_local_main, is_world_process_zero=self.strategy.is_main
        )
        self.control = TrainerControl()
        self.callback_handler = CallbackHandler(
            build_callbacks(self.args, callbacks or []),
            self.model,
            processing_class,
            self.optimizer,
            self.lr_scheduler,
        )
        self._new_step_parts()
        self._checkpoint_writer = CheckpointWriter(async_=self.args.save_async)
        self._train_batch_sampler: Any = None
        self._current_flos = 0.0
        self._step_lr = 0.0
        self._overrides_old_compute_loss = (
            "num_items_in_batch" not in inspect.signature(self.compute_loss).parameters
        )
        self.model = self.model_wrapped = self.strategy.place_model(self.model)
        self._fire("on_init_end")

    @property
    def precision(self) -> Precision:
        """The run's precision object; the strategy holds it (its dtype settings derive from it)."""
        return self.strategy.precision

    @precision.setter
    def precision(self, value: Precision) -> None:
        self.strategy.precision = value

    def _fire(self, event: str, **kwargs: Any) -> None:
        """Fire a callback event; a callback may hand back a new control object, which is kept."""
        handler = getattr(self.callback_handler, event)
        self.control = handler(self.args, self.state, self.control, **kwargs)

    def _new_step_parts(self) -> None:
        """Fresh run-state parts (position and loss, micro-batch split, step guard) for a new run."""
        self._progress = RunProgress(LossTracker(self.strategy.device, self.args.logging_nan_inf_filter))
        self._batch_split = MicroBatchSplit(
            self.args.auto_find_batch_size, self.args.per_device_train_batch_size
        )
        self.step_guard = StepGuard(
            self.args, self.precision.skips_nonfinite_steps, self.strategy.grad_norm_before_step
        )

    # -- building parts ----------------------------------------------------------------------------
    def _seed_everything(self) -> None:
        if self.args.full_determinism:
            enable_full_determinism(self.args.seed)
        else:
            set_seed(self.args.seed)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        if self.model_init is None:
            raise ValueError("Trainer needs `model` or `model_init`; pass one of them.")
        takes_trial = len(inspect.signature(self.model_init).parameters) >= 1
        model = self.model_init(trial) if takes_trial else self.model_init()
        if model is None:
            raise ValueError("`model_init` returned None; it must return an nn.Module.")
        return model

    def _fresh_model(self, trial: Any) -> None:
        """As transformers: with model_init, each train() call starts from a fresh (seeded) model."""
        self._seed_everything()
        self.model = self.model_wrapped = self.strategy.place_model(self.call_model_init(trial))
        self.callback_handler.model = self.model
        self.optimizer, self.lr_scheduler = None, None  # and a fresh optimizer

    def create_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            if self.optimizer_cls_and_kwargs is not None:
                cls, kwargs = self.optimizer_cls_and_kwargs
                self.optimizer = build_optimizer_from_cls(cls, kwargs, self.model, self.args)
            else:
                self.optimizer = build_optimizer(self.args, self.model)
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(
                self.args, optimizer or self.create_optimizer(), num_training_steps
            )
        return self.lr_scheduler

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self.create_scheduler(num_training_steps, self.create_optimizer())
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = (
            self.optimizer,
            self.lr_scheduler,
        )

    @property
    def scheduler_waits_for_metrics(self) -> bool:
        return isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def _prepare_dataset(self, dataset: Any, description: str) -> Any:
        if self.args.remove_unused_columns:
            return remove_unused_columns(dataset, self.model, self.label_names, description=description)
        return dataset

    def get_train_dataloader(self) -> Any:
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a `train_dataset`; pass it to Trainer(...).")
        dataset = self._prepare_dataset(self.train_dataset, "training")
        self._train_batch_sampler = None
        if not is_iterable_dataset(dataset):
            self._train_batch_sampler = self._make_train_batch_sampler(dataset)
        loader = build_train_dataloader(
            dataset,
            self.args,
            self.data_collator,
            self._train_batch_sampler,
            rank=self.strategy.dp_rank,
            world_size=self.strategy.dp_world_size,
        )
        self.callback_handler.train_dataloader = loader
        return loader

    def _make_train_batch_sampler(self, dataset: Any) -> Any:
        """The resumable batch sampler of map-style training data (Seq2SeqTrainer's sortish one)."""
        return make_train_batch_sampler(
            dataset, self.args, rank=self.strategy.dp_rank, world_size=self.strategy.dp_world_size
        )

    # -- training ------------------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        from .checkpoint.run_folder import hold_output_dir

        checks.check_output_dir_writable(self.args.output_dir)
        # One writer per output_dir: a second run there is refused before it touches anything.
        with hold_output_dir(self.args.output_dir, self.strategy):
            try:
                return self._train(resume_from_checkpoint, trial, ignore_keys_for_eval)
            except BaseException:
                # A save in flight finishes before the lock goes; its error must not hide this one.
                self._checkpoint_writer.settle()
                raise

    def _train(
        self,
        resume_from_checkpoint: str | bool | None,
        trial: Any,
        ignore_keys_for_eval: list[str] | None,
    ) -> TrainOutput:
        args = self.args
        self._start_time = time.perf_counter()
        self._memory = MemoryTracker(not args.skip_memory_metrics).start("train")
        if self.model_init is not None:
            self._fresh_model(trial)
        if args.tune_cpu_malloc and self.strategy.device.type == "cpu":
            keep_heap_between_steps()  # ~4% of a CPU step was the kernel refaulting freed memory
        loader, plan = self._plan_run()
        # The model pipeline (adapters -> activation checkpointing -> compile), then the strategy wraps.
        model = self.model_wrapped = self.strategy.setup_model(prepare_model(self.model, args))
        self.create_optimizer_and_scheduler(plan.max_steps)
        model, self.optimizer = self.strategy.setup_optimizer(model, self.optimizer)
        self.model_wrapped = model
        self.callback_handler.optimizer = self.optimizer
        self._begin_state(plan)
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
            checks.check_resume_position(self.state.global_step, plan.max_steps, str(resume_from_checkpoint))
        model.train()
        self._fire("on_train_begin")
        if args.eval_on_start and self.state.global_step == 0:
            self._evaluate(ignore_keys_for_eval)
        with (
            PreemptionWatcher(self.preemption_signals) as preemption,
            neftune_noise(model, args.neftune_noise_alpha),
        ):
            for epoch in range(self._progress.epoch, plan.num_epochs):
                if self.state.global_step >= plan.max_steps:
                    break
                self._fire("on_epoch_begin")
                steps = loop.grouped(self._epoch_batches(loader, epoch), args.gradient_accumulation_steps)
                for micro_batches in steps:
                    self._fire("on_step_begin")
                    step = self._batch_split.run_step(self, model, micro_batches)
                    self._progress.loss.add(step.loss)
                    self._step_lr = step.learning_rate
                    self._advance(epoch, micro_batches, plan)
                    self._fire("on_step_end")
                    if self.strategy.any_rank(preemption.requested):
                        self.control.should_save = self.control.should_training_stop = True
                    self._maybe_log_save_evaluate(step.grad_norm, ignore_keys_for_eval)
                    if self.control.should_epoch_stop or self.control.should_training_stop:
                        break
                if self.control.should_training_stop and self.strategy.any_rank(preemption.requested):
                    self._exit_preempted()
                self._progress.end_epoch()
                self._fire("on_epoch_end")
                self._maybe_log_save_evaluate(None, ignore_keys_for_eval)
                if self.control.should_training_stop:
                    break
        return self._finish_training()

    def _plan_run(self) -> tuple[Any, TrainPlan]:
        """The training loader and the run's length, refused before any work if either is unusable."""
        if self.train_dataset is not None:
            check_dataset_items(self.train_dataset, "train_dataset")
        loader = self.get_train_dataloader()
        plan = plan_steps(self.args, self._train_batch_sampler, self.strategy.dp_world_size)
        checks.check_plan(self.args, plan.max_steps)
        return loader, plan

    def _begin_state(self, plan: TrainPlan) -> None:
        self.state = TrainerState(
            max_steps=plan.max_steps,
            num_train_epochs=plan.num_epochs,
            train_batch_size=self.args.per_device_train_batch_size,
            is_local_process_zero=self.strategy.is_local_main,
            is_world_process_zero=self.strategy.is_main,
        )
        self.state.compute_steps(self.args, plan.max_steps)
        self.state.epoch = 0.0
        self.control = TrainerControl()
        self._plan = plan
        self._new_step_parts()
        self._current_flos = 0.0
        model = self.strategy.unwrap(self.model_wrapped)
        self._throughput = Throughput(
            self.args.flops_per_token or model_flops_per_token(model),
            self.args.device_peak_flops or device_peak_flops(self.strategy.device, self.precision.name),
            self.strategy.world_size,
            label_shift=self.label_shift,
        )

    def _epoch_batches(self, loader: Any, epoch: int) -> Any:
        """This epoch's micro-batches, starting where a resumed run left off (O(1): no replay)."""
        self._progress.start_epoch(epoch)
        skip = self._progress.step_in_epoch * self.args.gradient_accumulation_steps
        if self._train_batch_sampler is not None:
            self._train_batch_sampler.set_epoch(epoch)
            if skip:
                self._train_batch_sampler.skip_batches(skip)
        elif hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        return loader

    def _advance(self, epoch: int, micro_batches: list[dict[str, Any]], plan: TrainPlan) -> None:
        self.state.global_step += 1
        self._progress.advance()
        self._throughput.add(micro_batches)
        self._current_flos += float(sum(self.floating_point_ops(b) for b in micro_batches))
        steps = plan.steps_per_epoch
        self.state.epoch = epoch + (self._progress.step_in_epoch / steps if steps else 0.0)
        if self.args.include_num_input_tokens_seen not in ("no", False):
            self.state.num_input_tokens_seen += self._count_input_tokens(micro_batches)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its (detached) share of the step loss."""
        if not model.training:
            model.train()
        inputs = self._prepare_inputs(inputs)
        with self.precision.autocast():
            if self._overrides_old_compute_loss:
                # An override without num_items_in_batch returns a per-micro-batch mean.
                loss = self.compute_loss(model, inputs) / self.args.gradient_accumulation_steps
            else:
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        check_scalar_loss(loss)
        self.strategy.backward(self.precision.scale(loss), model)
        return loss.detach()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The micro-batch's loss, divided by the target count of the whole step when one is given.

        With `num_items_in_batch` (the step's target count on all ranks) the result is
        sum-of-target-losses / num_items_in_batch, so micro-batches add up to the exact step mean.
        """
        if self.args.chunked_loss is not False and not return_outputs:
            chunked = self._chunked_loss(model, inputs, num_items_in_batch)
            if chunked is not None:
                return chunked
        smoothing = self._label_smoothing > 0
        labels = (
            inputs.pop("labels") if (smoothing or self.compute_loss_func) and "labels" in inputs else None
        )
        outputs = model(**inputs)
        if labels is not None and self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif labels is not None:
            total = smoothed_loss_sum(logits_of(outputs), labels, self._label_smoothing, self.label_shift)
            count = (
                num_items_in_batch
                if num_items_in_batch is not None
                else count_targets({"labels": labels}, self.label_shift)
            )
            loss = total / count
        else:
            loss = loss_from_outputs(outputs, inputs, self.label_names)
            if num_items_in_batch is not None:
                share = count_targets(inputs, self.label_shift)
                # Without targets the model's mean loss is 0/0 = nan; its share of the step is 0.
                loss = torch.where(share > 0, loss * (share / num_items_in_batch), torch.zeros_like(loss))
        return (loss, outputs) if return_outputs else loss

    def _chunked_loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor | None:
        """The chunked causal-LM loss, or None where the plain path must run.

        `chunked_loss=True` tries every micro-batch and says once why it falls back; the default
        (None) chunks micro-batches of more than one chunk of labels, outside DeepSpeed, and falls
        back quietly: smaller ones gain nothing, and models it cannot serve exactly are not errors.
        """
        explicit = self.args.chunked_loss is True
        if not explicit:
            labels = inputs.get("labels")
            big = isinstance(labels, torch.Tensor) and labels.numel() > self.args.loss_chunk_size
            if not big or self.args.deepspeed:
                return None
        from .chunked_loss import chunked_causal_lm_loss, notice_fallback

        if self.compute_loss_func is not None:
            if explicit:
                notice_fallback("a compute_loss_func is given (it needs the logits)")
            return None
        return chunked_causal_lm_loss(
            model,
            inputs,
            num_items_in_batch,
            self.args.loss_chunk_size,
            self._label_smoothing,
            notice=explicit,
        )

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return to_device(inputs, self.strategy.device, non_blocking=True)

    def _maybe_log_save_evaluate(self, grad_norm: torch.Tensor | None, ignore_keys: list[str] | None) -> None:
        progress = self._progress
        if self.control.should_log and self.state.global_step > progress.last_logged_step:
            logs: dict[str, float] = {"loss": progress.loss.pop_mean(self.strategy.all_reduce_sum)}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            # As transformers: the rate this step's update used, read before the scheduler stepped.
            logs["learning_rate"] = self._step_lr
            logs.update(self.step_guard.counts())
            self._transient_logs = self._throughput.rates(self.strategy.all_reduce_sum)
            progress.last_logged_step = self.state.global_step
            self.store_flos()
            self.log(logs)
        metrics = None
        if self.control.should_evaluate:
            metrics = self._evaluate(ignore_keys)
            is_best = self._is_new_best(metrics)
            if self.args.save_strategy == "best":
                self.control.should_save = is_best
        if self.control.should_save:
            self._save_checkpoint(metrics)
            self._fire("on_save")

    def _stateful_parts(self) -> Parts:
        """The run's state as named parts, for checkpoint code (which never sees the trainer)."""
        from .checkpoint.rng import RngState
        from .checkpoint.training import Parts

        return Parts(
            model=self.model_wrapped,
            optimizer=self.optimizer,
            scheduler=self.lr_scheduler,
            precision=self.precision,
            progress=self._progress,
            sampler=self._train_batch_sampler,
            callbacks=CallbackStates(lambda: self.callback_handler.callbacks, self.control),
            rng=RngState(),
            batch_split=self._batch_split,
            guard=self.step_guard,
        )

    def _save_checkpoint(self, metrics: dict[str, float] | None) -> None:
        """Write `output_dir/checkpoint-N/` atomically (in the background with save_async)."""
        from .checkpoint.training import save_checkpoint

        self.store_flos()
        save_checkpoint(
            self._stateful_parts(),
            self.strategy,
            self._checkpoint_writer,
            self.args,
            self.state,
            self.processing_class,
        )

    def _resume(self, checkpoint: str | bool) -> None:
        from .checkpoint.training import resume

        resume(self._stateful_parts(), self.strategy, self.args, self.state, checkpoint)
        # The micro-batch size auto_find_batch_size found (the split came back with the checkpoint).
        self.state.train_batch_size = self._batch_split.micro_batch_size

    def _keep_only_best_checkpoint(self) -> None:
        """As transformers: with save_total_limit=1, a finished run leaves only the best checkpoint."""
        from .checkpoint.rotation import keep_only

        if self.strategy.is_main:
            keep_only(self.args.output_dir, Path(str(self.state.best_model_checkpoint)))
        self.strategy.barrier()

    def _exit_preempted(self) -> None:
        self._checkpoint_writer.wait()
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        logger.warning(
            "ember: preempted at step %d; checkpoint written to %s. Run again with "
            "resume_from_checkpoint=True to continue exactly.",
            self.state.global_step,
            folder,
        )
        self.strategy.barrier()
        raise TrainingPreempted(self.state.global_step, str(folder))

    def _finish_training(self) -> TrainOutput:
        self._checkpoint_writer.wait()
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            logger.info(
                "Loading the best model from %s (%s = %s).",
                self.state.best_model_checkpoint,
                self.args.metric_for_best_model,
                self.state.best_metric,
            )
            self.strategy.load_model_weights(self.model_wrapped, Path(self.state.best_model_checkpoint))
        if self.args.save_total_limit == 1 and self.state.best_model_checkpoint is not None:
            self._keep_only_best_checkpoint()
        loss = self._progress.loss
        if loss.steps_since_log:
            loss.pop_mean(self.strategy.all_reduce_sum)
        train_loss = loss.mean()
        plan = self._plan
        metrics = speed_metrics(
            "train",
            self._start_time,
            num_samples=plan.num_samples_seen(self.state.global_step),
            num_steps=self.state.global_step,
        )
        self.store_flos()
        metrics["total_flos"] = float(self.state.total_flos)
        metrics["train_loss"] = train_loss
        metrics["epoch"] = float(self.state.epoch or 0.0)
        metrics.update(self._memory.stop("train"))
        self.log(dict(metrics))
        self._fire("on_train_end")
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # -- saving --------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from .checkpoint.model import save_model_files

        folder = Path(output_dir or self.args.output_dir)
        # Every rank calls model_state_dict: gathering a sharded model is a collective.
        state_dict = self.strategy.model_state_dict(self.model_wrapped)
        if self.strategy.is_main:
            save_model_files(
                self.strategy.unwrap(self.model_wrapped), folder, self.processing_class, state_dict=state_dict
            )

    # -- callbacks -----------------------------------------------------------------------------------
    def add_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> TrainerCallback | None:
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        self.callback_handler.remove_callback(callback)
