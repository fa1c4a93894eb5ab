"""The Trainer: builds its parts from the arguments, then runs train / evaluate / predict.

`train()` reads top to bottom; the work of one optimizer step lives in `engine/step.py`, the evaluation
loop in `engine/evaluation_loop.py`, placement and collectives in the strategy (`strategy/`), dtype handling
in the precision object. The trainer never asks which backend or precision it runs with.
The Trainer holds collaborators rather than mixing them in: an `Evaluator` (`trainer/evaluation.py`),
a `MetricsRecorder` (`trainer/logs.py`) and a `Checkpointer` (`trainer/checkpointing.py`); what one
`train()` call owns is one `Run` (`trainer/run.py`). The methods transformers' Trainer has (`log`,
`training_step`, `compute_loss`, `evaluate`, ...) stay here as overridable members, and the
collaborators call back through them, so a subclass's override is the one that runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from ..args.accelerator_config import accelerator_config_of, check_split_batches, rank_batch_size
from ..args.training_args import TrainingArguments, check_eval_dataset
from ..callbacks import CallbackHandler, TrainerCallback, build_callbacks
from ..callbacks.state import CallbackStates, TrainerControl, TrainerState
from ..checkpoint.hub import HubSync
from ..data import (
    build_eval_dataloader,
    build_train_dataloader,
    is_iterable_dataset,
    make_train_batch_sampler,
    pick_collator,
    remove_unused_columns,
)
from ..data.checks import check_dataset_items, check_scalar_loss
from ..data.columns import default_label_names
from ..data.loaders import SkipFirstBatches
from ..engine import checks
from ..engine.evaluation_loop import speed_metrics
from ..engine.guards import StepGuard
from ..engine.loss import count_targets, logits_of, loss_from_outputs, shifts_labels, smoothed_loss_sum
from ..engine.micro_batches import MicroBatchSplit
from ..engine.optim import build_optimizer, build_optimizer_from_cls, build_scheduler
from ..engine.optimizers import optimizer_eval_mode, set_optimizer_mode
from ..engine.preemption import PreemptionWatcher, TrainingPreempted
from ..engine.run_position import LossTracker, RunProgress, TrainPlan, plan_steps
from ..engine.step import StepContext, grouped, target_counts
from ..models.liger import chunked_loss_setting, plan_liger
from ..models.neftune import neftune_noise
from ..models.pipeline import label_smoothing_for, prepare_model
from ..outputs import EvalLoopOutput, PredictionOutput, TrainOutput
from ..strategy import build_strategy, fsdp_enabled
from ..strategy.env import PeerFailure, is_communication_error
from ..strategy.peers import (
    AFTER_STEP,
    BOUNDARY,
    COMPUTE,
    LOADING,
    SAVE_GATHER,
    SAVING,
    STEP_BEGIN,
    STEP_END,
    NoWatch,
    PeerWatch,
    build_watch,
)
from ..strategy.precision import Precision
from ..telemetry.cpu_malloc import keep_heap_between_steps
from ..telemetry.memory import MemoryTracker
from ..telemetry.overflow import watch_underflow_overflow
from ..telemetry.throughput import Throughput, device_peak_flops, model_flops_per_token
from ..utils import count_parameters, enable_full_determinism, set_seed, to_device
from .accelerator import EmberAccelerator
from .checkpointing import Checkpointer
from .evaluation import Evaluator
from .full_eval import full_eval_model
from .logs import MetricsRecorder, count_input_tokens
from .run import Run
from .run_log import log_training_start

if TYPE_CHECKING:
    from ..checkpoint.training import Parts
    from ..search import BestRun

logger = logging.getLogger("ember")


class Trainer:
    """Drop-in for `transformers.Trainer`: same constructor, same methods, same callbacks."""

    #: Signals that make train() checkpoint at the end of the current step and exit; add
    #: `signal.SIGUSR1` for schedulers that warn with it.
    preemption_signals: tuple[int, ...] = (signal.SIGTERM,)
    #: Set while hyperparameter_search runs ("optuna"), and the objective of the current trial.
    hp_search_backend: str | None = None
    objective: Any = None

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
        self.args = args if args is not None else self._default_args()
        # As transformers: what building the trainer (model placement included) cost, reported once
        # with the first train()'s metrics.
        init_memory = MemoryTracker(not self.args.skip_memory_metrics).start("init")
        checks.check_trainer_inputs(model, model_init, optimizers, optimizer_cls_and_kwargs)
        check_eval_dataset(self.args, eval_dataset is not None)
        self.strategy = build_strategy(self.args)
        check_split_batches(self.args, self.strategy.dp_world_size)
        if self._non_blocking and not self.args.dataloader_pin_memory:
            logger.warning(
                "accelerator_config['non_blocking']=True but dataloader_pin_memory=False: a copy from "
                "unpinned memory waits anyway; set dataloader_pin_memory=True for the copies to overlap."
            )
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
        # None without use_liger_kernel; else whether Liger's kernels will patch the model (if not,
        # the reason is logged here, once, and the loss is chunked instead).
        self._liger_applied: bool | None = None
        if self.args.use_liger_kernel:
            self._liger_applied = plan_liger(self.model, self.args.liger_kernel_config) is None
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
        self.evaluator = Evaluator(self)
        self.recorder = MetricsRecorder()
        self.hub = HubSync(self.args, self.create_hub_api)
        self.checkpointer = Checkpointer(self.strategy, self.args.save_async, self.hub)
        self.hub_model_id: str | None = None  # the full repo id, once init_hf_repo found it
        if self.args.push_to_hub:
            self.init_hf_repo()
        self.run: Run | None = None  # what the current (or last) train() call owns
        self._peers: PeerWatch | NoWatch = NoWatch()
        self._train_batch_sampler: Any = None
        self.is_in_train = False
        self._overrides_old_compute_loss = (
            "num_items_in_batch" not in inspect.signature(self.compute_loss).parameters
        )
        if compute_loss_func is not None and self.get_cp_size() > 1:
            raise ValueError(
                "compute_loss_func receives whole-sequence labels, but parallelism_config['cp_size'] > 1 "
                "gives each rank a part of every sequence; drop compute_loss_func or set cp_size to 1."
            )
        self.model = self.model_wrapped = self.strategy.place_model(self.model)
        self._init_memory_metrics = init_memory.stop("init")
        self._fire("on_init_end")
        self._finish_init()

    @classmethod
    def _default_args(cls) -> TrainingArguments:
        """The arguments a Trainer built without `args` uses (transformers' defaults)."""
        return TrainingArguments()

    def _finish_init(self) -> None:
        """What a subclass sets up once the Trainer is built (Seq2SeqTrainer: generation settings)."""

    @property
    def precision(self) -> Precision:
        """The run's precision object; the strategy holds it (its dtype settings derive from it)."""
        return self.strategy.precision

    @precision.setter
    def precision(self, value: Precision) -> None:
        self.strategy.precision = value

    @functools.cached_property
    def accelerator(self) -> EmberAccelerator:
        """accelerate's `Accelerator` members that subclasses call, over this run's strategy (one
        object per Trainer: it holds no state of its own, and subclasses reach for it every step)."""
        return EmberAccelerator(self)

    @property
    def is_deepspeed_enabled(self) -> bool:
        return bool(self.args.deepspeed)

    @property
    def is_fsdp_enabled(self) -> bool:
        return fsdp_enabled(self.args.fsdp)

    @property
    def _train_batch_size(self) -> int:
        """transformers' name for the per-device micro-batch size (what auto_find_batch_size found)."""
        if self.run is None:
            return self.args.per_device_train_batch_size
        return self.run.batch_split.micro_batch_size

    def _fire(self, event: str, **kwargs: Any) -> None:
        """Fire a callback event; a callback may hand back a new control object, which is kept."""
        handler = getattr(self.callback_handler, event)
        self.control = handler(self.args, self.state, self.control, **kwargs)

    @property
    def step_guard(self) -> StepGuard:
        """The current run's step guard (its counters and rollbacks)."""
        return self._current_run().guard

    def _current_run(self) -> Run:
        if self.run is None:
            raise RuntimeError("The trainer has no run yet; call train() first.")
        return self.run

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

    def _rank_batch_size(self) -> int:
        """The training batch one rank loads: per_device_train_batch_size, or its share of it with
        accelerator_config's split_batches."""
        return rank_batch_size(self.args.per_device_train_batch_size, self.args, self.strategy.dp_world_size)

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
        from ..checkpoint.run_folder import hold_output_dir

        checks.check_output_dir_writable(self.args.output_dir)
        self.is_in_train = True
        # One writer per output_dir: a second run there is refused before it touches anything.
        with hold_output_dir(self.args.output_dir, self.strategy):
            self._peers = build_watch(self.strategy, self.args.peer_stall_timeout).start()
            try:
                return self._train(resume_from_checkpoint, trial, ignore_keys_for_eval)
            except BaseException as error:
                # A save in flight finishes before the lock goes; its error must not hide this one.
                self.checkpointer.settle()
                self._raise_by_name(error)
                raise
            finally:
                self._peers.stop()
                self.is_in_train = False

    def _raise_by_name(self, error: BaseException) -> None:
        """Across ranks, a failure names its rank, step and cause on every rank (strategy/peers.py):
        a rank stopped by a failed peer raises `PeerFailure` saying so; the failed rank tells them."""
        if isinstance(error, TrainingPreempted):
            return  # every rank stops together, by design
        if not is_communication_error(error):
            # This rank's own error (also when every rank raises one, as a search's pruned trial
            # does): it stays what it is, and the other ranks are told.
            self._peers.report_failure(error)
            return
        peer = self._peers.peer_failure()
        if peer is not None and peer not in str(error):
            raise PeerFailure(f"ember: rank {self.strategy.rank}: stopping because {peer}.") from error

    def _train(
        self,
        resume_from_checkpoint: str | bool | None,
        trial: Any,
        ignore_keys_for_eval: list[str] | None,
    ) -> TrainOutput:
        args = self.args
        start_time = time.perf_counter()
        memory = MemoryTracker(not args.skip_memory_metrics).start("train")
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
        run = self.run = self._start_run(plan, model, start_time, memory)
        log_training_start(self, plan, loader)
        resume_from_checkpoint = self._resume_target(resume_from_checkpoint)
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
            checks.check_resume_position(self.state.global_step, plan.max_steps, str(resume_from_checkpoint))
        model.train()
        set_optimizer_mode(self.optimizer, training=True)  # schedule-free: weights at the train point
        self._fire("on_train_begin")
        if args.eval_on_start and self.state.global_step == 0:
            self._evaluate(ignore_keys_for_eval)
        with (
            PreemptionWatcher(self.preemption_signals) as preemption,
            neftune_noise(model, args.neftune_noise_alpha),
            watch_underflow_overflow(
                self.strategy.unwrap(model), args.debug, lambda: self.state.global_step + 1
            ),
        ):
            for epoch in range(run.progress.epoch, plan.num_epochs):
                if self.state.global_step >= plan.max_steps:
                    break
                self._fire("on_epoch_begin")
                steps = grouped(self._epoch_batches(loader, epoch), args.gradient_accumulation_steps)
                for micro_batches in steps:
                    # Where this rank is, for its peers to tell a hang from a long step (an attribute write).
                    mark, now = self._peers.mark, self.state.global_step + 1
                    mark(now, STEP_BEGIN)
                    self._fire("on_step_begin")
                    mark(now, COMPUTE)
                    step = run.optimizer_step(micro_batches)
                    run.progress.loss.add(step.loss, step.skipped)
                    run.learning_rate = step.learning_rate
                    self._advance(epoch, micro_batches)
                    mark(now, STEP_END)
                    self._fire_step_end(run)
                    mark(now, BOUNDARY)
                    if self.strategy.any_rank(preemption.requested):
                        self.control.should_save = self.control.should_training_stop = True
                    mark(now, AFTER_STEP)
                    self._maybe_log_save_evaluate(step.grad_norm, ignore_keys_for_eval)
                    mark(now, LOADING)
                    if self.control.should_epoch_stop or self.control.should_training_stop:
                        break
                if self.control.should_training_stop and self.strategy.any_rank(preemption.requested):
                    self._exit_preempted()
                run.progress.end_epoch()
                self._peers.mark(self.state.global_step, AFTER_STEP)
                self._fire("on_epoch_end")
                self._maybe_log_save_evaluate(None, ignore_keys_for_eval)
                self._peers.mark(self.state.global_step, LOADING)
                if self.control.should_training_stop:
                    break
        return self._finish_training()

    def _plan_run(self) -> tuple[Any, TrainPlan]:
        """The training loader and the run's length, refused before any work if either is unusable."""
        if self.train_dataset is not None:
            check_dataset_items(self.train_dataset, "train_dataset")
        checks.check_eval_sets_before_training(self.args, self.eval_dataset)
        loader = self.get_train_dataloader()
        plan = plan_steps(self.args, self._train_batch_sampler, self.strategy.dp_world_size)
        checks.check_plan(self.args, plan.max_steps)
        return loader, plan

    def _start_run(self, plan: TrainPlan, model: nn.Module, start_time: float, memory: MemoryTracker) -> Run:
        """A fresh state and control, and the run's parts, for a train() call about to start."""
        args, strategy = self.args, self.strategy
        self.state = TrainerState(
            max_steps=plan.max_steps,
            num_train_epochs=plan.num_epochs,
            train_batch_size=args.per_device_train_batch_size,
            is_local_process_zero=strategy.is_local_main,
            is_world_process_zero=strategy.is_main,
        )
        self.state.compute_steps(args, plan.max_steps)
        self.state.epoch = 0.0
        self.control = TrainerControl()
        self.recorder.flos_since_store = 0.0
        assert self.optimizer is not None, "train() builds the optimizer before the run starts"
        step_parts = StepContext(
            args=args,
            state=self.state,
            strategy=strategy,
            model_wrapped=model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            label_shift=self.label_shift,
            progress=RunProgress(LossTracker(strategy.device, args.logging_nan_inf_filter)),
            guard=StepGuard(args, self.precision.skips_nonfinite_steps, strategy.grad_norm_before_step),
            training_step=self.training_step,
            fire=self._fire,
        )
        throughput = Throughput(
            args.flops_per_token or model_flops_per_token(strategy.unwrap(model)),
            args.device_peak_flops or device_peak_flops(strategy.device, self.precision.name),
            strategy.world_size,
            label_shift=self.label_shift,
        )
        batch_split = MicroBatchSplit(args.auto_find_batch_size, self._rank_batch_size())
        return Run(plan, step_parts, batch_split, throughput, memory, start_time)

    def _epoch_batches(self, loader: Any, epoch: int) -> Any:
        """This epoch's micro-batches, starting where a resumed run left off (O(1): no replay)."""
        progress = self._current_run().progress
        progress.start_epoch(epoch)
        skip = progress.step_in_epoch * self.args.gradient_accumulation_steps
        if self._train_batch_sampler is not None:
            self._train_batch_sampler.set_epoch(epoch)
        elif hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        return self.get_resumed_dataloader(loader, skip) if skip else loader

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        """transformers' hook for a mid-epoch resume: `dataloader` without its first `num_batches`
        micro-batches. A subclass may override it (a stateful or streaming loader that skips itself).

        ember's own answer costs O(1) for map-style data: the resumable sampler starts after those
        batches and nothing is loaded. An iterable dataset has no position to jump to, so its first
        batches are read and dropped, as transformers does.
        """
        if self._train_batch_sampler is not None:
            self._train_batch_sampler.skip_batches(num_batches)
            return dataloader
        return SkipFirstBatches(dataloader, num_batches)

    def _advance(self, epoch: int, micro_batches: list[dict[str, Any]]) -> None:
        run = self._current_run()
        self.state.global_step += 1
        run.progress.advance()
        run.throughput.add(micro_batches)
        self.recorder.flos_since_store += float(sum(self.floating_point_ops(b) for b in micro_batches))
        steps = run.plan.steps_per_epoch
        self.state.epoch = epoch + (run.progress.step_in_epoch / steps if steps else 0.0)
        if self.args.include_num_input_tokens_seen not in ("no", False):
            self.state.num_input_tokens_seen += count_input_tokens(self.args, self.strategy, micro_batches)

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
        # Targets already aligned with the logits (`shift_labels`, as transformers names them; context
        # parallelism makes them) are scored here as given: neither the model's shift nor the
        # chunked loss's applies to them.
        shifted = inputs.pop("shift_labels", None) if self.compute_loss_func is None else None
        if shifted is not None:
            inputs.pop("labels", None)
            if self.args.chunked_loss is True:
                from ..engine.chunked_loss import notice_fallback

                notice_fallback("the targets come already shifted (shift_labels: context parallelism)")
        elif (
            chunked_loss_setting(self.args.chunked_loss, self._liger_applied) is not False
            and not return_outputs
        ):
            chunked = self._chunked_loss(model, inputs, num_items_in_batch)
            if chunked is not None:
                return chunked
        smoothing = self._label_smoothing > 0
        labels = shifted
        if labels is None and (smoothing or self.compute_loss_func) and "labels" in inputs:
            labels = inputs.pop("labels")
        shift = self.label_shift and shifted is None
        outputs = model(**inputs)
        if labels is not None and self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif labels is not None:
            total = smoothed_loss_sum(logits_of(outputs), labels, self._label_smoothing, shift)
            count = (
                num_items_in_batch
                if num_items_in_batch is not None
                else count_targets({"labels": labels}, shift)
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
        explicit = chunked_loss_setting(self.args.chunked_loss, self._liger_applied) is True
        if not explicit:
            labels = inputs.get("labels")
            big = isinstance(labels, torch.Tensor) and labels.numel() > self.args.loss_chunk_size
            if not big or self.args.deepspeed:
                return None
        from ..engine.chunked_loss import chunked_causal_lm_loss, notice_fallback

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

    @property
    def _non_blocking(self) -> bool:
        """accelerator_config's non_blocking: copy batches to the device without waiting for the copy."""
        return accelerator_config_of(self.args).non_blocking

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = to_device(inputs, self.strategy.device, non_blocking=self._non_blocking)
        # Under context parallelism a training micro-batch becomes this rank's part of each sequence;
        # evaluation keeps whole sequences.
        return self.strategy.split_sequences(inputs) if self.model.training else inputs

    def _maybe_log_save_evaluate(self, grad_norm: torch.Tensor | None, ignore_keys: list[str] | None) -> None:
        run = self._current_run()
        progress = run.progress
        if self.control.should_log and self.state.global_step > progress.last_logged_step:
            logs: dict[str, float] = {}
            # A window of only skipped steps has no loss to report (not a loss of 0): it says how
            # many steps it skipped instead, next to the guard's running counts.
            if progress.loss.steps_since_log:
                logs["loss"] = progress.loss.pop_mean(self.strategy.all_reduce_sum)
            skipped = progress.loss.pop_skipped()
            if skipped:
                logs["skipped_steps"] = float(sum(skipped.values()))
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            # As transformers: the rate this step's update used, read before the scheduler stepped.
            logs["learning_rate"] = run.learning_rate
            logs.update(run.guard.counts())
            self.recorder.set_aside(run.throughput.rates(self.strategy.all_reduce_sum))
            progress.last_logged_step = self.state.global_step
            self.store_flos()
            self.log(logs)
        metrics = None
        if self.control.should_evaluate:
            metrics = self._evaluate(ignore_keys)
            is_best = self.evaluator.is_new_best(metrics)
            if self.args.save_strategy == "best":
                self.control.should_save = is_best
        if self.control.should_save:
            self._save_checkpoint(metrics)
            self._fire("on_save")

    def _fire_step_end(self, run: Run) -> None:
        try:
            self._fire("on_step_end")
        except Exception as error:
            if not run.batch_split.shrink_after_step(run.step_parts, error):
                raise

    def _load_callback_state(self) -> None:
        """transformers' name: restore the callbacks' and control's state from
        `self.state.stateful_callbacks` (resume does this), if restore_callback_states_from_checkpoint."""
        if self.args.restore_callback_states_from_checkpoint:
            states = CallbackStates(lambda: self.callback_handler.callbacks, self.control)
            states.load_state_dict(self.state.stateful_callbacks)

    def _stateful_parts(self) -> Parts:
        """The run's state as named parts, for checkpoint code (which never sees the trainer)."""
        from ..checkpoint.rng import RngState
        from ..checkpoint.training import Parts

        run = self._current_run()
        return Parts(
            model=self.model_wrapped,
            optimizer=self.optimizer,
            scheduler=self.lr_scheduler,
            precision=self.precision,
            progress=run.progress,
            sampler=self._train_batch_sampler,
            callbacks=CallbackStates(lambda: self.callback_handler.callbacks, self.control),
            rng=RngState(),
            batch_split=run.batch_split,
            guard=run.guard,
        )

    def _save_checkpoint(self, metrics: dict[str, float] | None) -> None:
        """Write `output_dir/checkpoint-N/` atomically (in the background with save_async)."""
        self.store_flos()
        step, peers = self.state.global_step, self._peers
        peers.mark(step, SAVE_GATHER)  # a hang in a callback's state() is found like one in a step

        def ready() -> None:  # this rank's own state is gathered: meet the others (a failed one is named)
            peers.mark(step, SAVING)
            self.strategy.enter_checkpoint(step, peers)

        with optimizer_eval_mode(self.optimizer):  # schedule-free: save the averaged weights
            parts = self._stateful_parts()
            pushing = self.checkpointer.save(parts, self.args, self.state, self.processing_class, ready)
        peers.mark(step, AFTER_STEP)  # on_save callbacks: rank-0-only work there (an upload) is legitimate
        if pushing:
            self._fire("on_push_begin")

    def _resume_target(self, requested: str | bool | None) -> str | bool | None:
        """What train() resumes from. A value given to train() keeps transformers' meaning (a folder;
        True: the newest complete checkpoint, an error if none; False: start fresh). None lets
        `auto_resume` decide: on, a relaunched job continues from the newest complete checkpoint of
        output_dir when there is one and starts fresh when there is none, with no change to the
        script. Unset, it is on only where the launcher says the job was relaunched."""
        if requested is not None:
            return requested
        from ..checkpoint.run_folder import auto_resume_checkpoint
        from ..strategy.env import relaunch_reason

        auto = self.args.auto_resume
        why = "auto_resume=True" if auto else (relaunch_reason() if auto is None else None)
        if why is None:
            return None
        return auto_resume_checkpoint(self.args.output_dir, self.strategy, why, self.args.verify_checkpoints)

    def _resume(self, checkpoint: str | bool) -> None:
        self.checkpointer.resume(self._stateful_parts(), self.args, self.state, checkpoint)
        # The micro-batch size auto_find_batch_size found (the split came back with the checkpoint).
        self.state.train_batch_size = self._current_run().batch_split.micro_batch_size

    def _exit_preempted(self) -> None:
        self.checkpointer.wait()
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
        run = self._current_run()
        self.checkpointer.wait()
        # Schedule-free: the trained model is the averaged point (what evaluation and saves use, and
        # what load_best_model_at_end loads); train() moves back to the train point.
        set_optimizer_mode(self.optimizer, training=False)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            logger.info(
                "Loading the best model from %s (%s = %s).",
                self.state.best_model_checkpoint,
                self.args.metric_for_best_model,
                self.state.best_metric,
            )
            self.strategy.load_model_weights(self.model_wrapped, Path(self.state.best_model_checkpoint))
        if self.args.save_total_limit == 1 and self.state.best_model_checkpoint is not None:
            self.checkpointer.keep_only_best(self.args, self.state)
        loss = run.progress.loss
        if loss.steps_since_log:
            loss.pop_mean(self.strategy.all_reduce_sum)
        loss.pop_skipped()
        train_loss = loss.mean()
        metrics = speed_metrics(
            "train",
            run.start_time,
            num_samples=run.plan.num_samples_seen(self.state.global_step),
            num_steps=self.state.global_step,
        )
        self.store_flos()
        metrics["total_flos"] = float(self.state.total_flos)
        metrics["train_loss"] = train_loss
        metrics["epoch"] = float(self.state.epoch or 0.0)
        metrics.update(run.memory.stop("train"))
        metrics.update(self._init_memory_metrics)
        self._init_memory_metrics = {}
        self.log(dict(metrics))
        self._fire("on_train_end")
        self._finish_current_push()
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # -- evaluation and prediction (the Evaluator's work, overridable here) ---------------------------
    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError(
                "evaluate() needs an eval dataset: pass `eval_dataset` to Trainer(...) or evaluate()."
            )
        checks.check_eval_dataset_not_empty(dataset)
        loader = build_eval_dataloader(
            self._prepare_dataset(dataset, "evaluation"),
            self.args,
            self.data_collator,
            rank=self.strategy.dp_rank,
            world_size=self.strategy.dp_world_size,
        )
        self.callback_handler.eval_dataloader = loader
        return loader

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        return build_eval_dataloader(
            self._prepare_dataset(test_dataset, "test"),
            self.args,
            self.data_collator,
            rank=self.strategy.dp_rank,
            world_size=self.strategy.dp_world_size,
        )

    def model_for_eval(self) -> nn.Module:
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        return full_eval_model(model, self.args, self.is_in_train)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        return self.evaluator.evaluate(dataset, ignore_keys, metric_key_prefix)

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        return self.evaluator.predict(test_dataset, ignore_keys, metric_key_prefix)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """(loss, logits, labels) of one batch, without gradients."""
        return self.evaluator.prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The loop behind evaluate() and predict(), for subclasses that call it directly."""
        return self.evaluator.loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )

    def _evaluate(self, ignore_keys: list[str] | None) -> dict[str, float]:
        return self.evaluator.during_training(ignore_keys, self.scheduler_waits_for_metrics)

    # -- what a run records (the MetricsRecorder's work, overridable here) ----------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record `logs` in `state.log_history` and hand them to the callbacks' `on_log`.

        A step log's wall-clock figures (samples/s, tokens/s, MFU) go to `on_log` only: trackers and
        the progress bar show them, while the history keeps what reproducible runs agree on.
        """
        self._fire("on_log", logs=self.recorder.record(self.args, self.state, logs))

    def store_flos(self) -> None:
        """Add the FLOPs counted since the last call, summed over ranks, to `state.total_flos`."""
        self.recorder.store_flos(self.state, self.strategy)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Forward + backward FLOPs of one micro-batch: 6 x parameters x tokens of the main input.

        transformers models count their non-embedding parameters; a plain module counts all of
        them. A batch without the model's main input (`main_input_name`, default input_ids)
        counts 0, as in transformers. Override this for a better estimate.
        """
        return self.recorder.floating_point_ops(self.strategy.unwrap(self.model_wrapped), inputs)

    # -- saving --------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from ..checkpoint.model import save_model_files

        folder = Path(output_dir or self.args.output_dir)
        # Every rank calls model_state_dict: gathering a sharded model is a collective.
        with optimizer_eval_mode(self.optimizer):  # schedule-free: save the averaged weights
            state_dict = self.strategy.model_state_dict(self.model_wrapped)
            if self.strategy.is_main:
                save_model_files(
                    self.strategy.unwrap(self.model_wrapped),
                    folder,
                    self.processing_class,
                    state_dict=state_dict,
                )
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # -- callbacks -----------------------------------------------------------------------------------
    def add_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> TrainerCallback | None:
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        self.callback_handler.remove_callback(callback)

    # == transformers' compatibility surface: small members scripts and subclasses call ============

    # -- precision contexts (for custom training_step / compute_loss overrides) ----------------------
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> Any:
        """The autocast context of the run's precision (a no-op context in fp32)."""
        return self.precision.autocast()

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        """Everything the forward and loss run under: here, autocast."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast_smart_context_manager())
        return stack

    # -- batch sizes -----------------------------------------------------------------------------------
    def get_tp_size(self) -> int:
        """Ranks that split each layer (parallelism_config['tp_size']); 1 without tensor parallelism."""
        return int(getattr(self.strategy, "tp_size", 1))

    def get_cp_size(self) -> int:
        """Ranks that split each training sequence (parallelism_config['cp_size']); 1 without."""
        return int(getattr(self.strategy, "cp_size", 1))

    def get_sp_size(self) -> int:
        return 1  # as is sequence parallelism (accelerate's sp_size)

    def get_total_train_batch_size(self, args: Any) -> int:
        """Samples per optimizer step on all ranks: per-device batch x accumulation x data-parallel ranks."""
        world = self.strategy.dp_world_size
        per_rank = rank_batch_size(args.per_device_train_batch_size, args, world)
        return per_rank * args.gradient_accumulation_steps * world

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device | None = None
    ) -> tuple[list[Any], torch.Tensor | None]:
        """The next `num_batches` micro-batches and their target count on all ranks (the loss divisor)."""
        batches: list[Any] = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        return batches, target_counts(batches, self.label_shift, self.strategy, device)[2]

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters weight decay applies to (not biases, not norm weights)."""
        from ..engine.optim import get_decay_parameter_names

        return get_decay_parameter_names(model)

    # -- transformers' script helpers ------------------------------------------------------------------
    def is_world_process_zero(self) -> bool:
        return self.strategy.is_main

    def is_local_process_zero(self) -> bool:
        return self.strategy.is_local_main

    def metrics_format(self, metrics: dict[str, float]) -> dict[str, Any]:
        from ..report.summary import metrics_format

        return metrics_format(metrics)

    def log_metrics(self, split: str, metrics: dict[str, float]) -> None:
        """Print `metrics` as an aligned table headed by `split` (main process only)."""
        from ..report.summary import metrics_table

        if self.is_world_process_zero():
            print(metrics_table(split, metrics))

    def save_metrics(self, split: str, metrics: dict[str, float], combined: bool = True) -> None:
        """Write `output_dir/{split}_results.json`; with `combined`, merge into `all_results.json`."""
        if not self.is_world_process_zero():
            return
        folder = Path(self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f"{split}_results.json", metrics)
        if combined:
            merged_path = folder / "all_results.json"
            merged = json.loads(merged_path.read_text(encoding="utf-8")) if merged_path.exists() else {}
            merged.update(metrics)
            _write_json(merged_path, merged)

    def save_state(self) -> None:
        """Write `output_dir/trainer_state.json` (main process only)."""
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            self.state.save_to_json(os.path.join(self.args.output_dir, "trainer_state.json"))

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write a draft `output_dir/README.md`: names, hyperparameters and the results table.

        Local only: nothing is looked up or pushed to a hub.
        """
        from ..report.summary import model_card

        if not self.is_world_process_zero():
            return
        text = model_card(
            self,
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        Path(self.args.output_dir, "README.md").write_text(text, encoding="utf-8")

    def num_examples(self, dataloader: Any) -> int:
        """Samples in `dataloader`'s dataset, or batches x batch size when it has no length."""
        try:
            return len(dataloader.dataset)
        except (AttributeError, TypeError):
            return len(dataloader) * self.args.per_device_train_batch_size

    def num_tokens(self, train_dl: Any, max_steps: int | None = None) -> int:
        """Tokens of `input_ids` in `train_dl` (only its first `max_steps` x GA batches if given)."""
        limit = None if max_steps is None else max_steps * self.args.gradient_accumulation_steps
        total = 0
        for i, batch in enumerate(train_dl):
            if limit is not None and i >= limit:
                break
            ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
            if isinstance(ids, torch.Tensor):
                total += ids.numel()
        return total

    def get_num_trainable_parameters(self) -> int:
        return count_parameters(self.model, trainable_only=True)

    def get_learning_rates(self) -> list[float]:
        return [group["lr"] for group in self._require_optimizer().param_groups]

    def get_optimizer_group(self, param: str | torch.nn.Parameter | None = None) -> Any:
        """The parameter group holding `param`, or every group's parameter list when None."""
        optimizer = self._require_optimizer()
        if param is not None:
            for group in optimizer.param_groups:
                if any(p is param for p in group["params"]):
                    return group
        return [group["params"] for group in optimizer.param_groups]

    def _require_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise ValueError(
                "The trainer has no optimizer yet; call train() or create_optimizer() before asking for it."
            )
        return self.optimizer

    # -- hyperparameter search -------------------------------------------------------------------------
    def hyperparameter_search(
        self,
        hp_space: Callable[[Any], dict[str, Any]] | None = None,
        compute_objective: Callable[[dict[str, float]], Any] | None = None,
        n_trials: int = 20,
        direction: str | list[str] = "minimize",
        backend: str | None = None,
        hp_name: Callable[[Any], str] | None = None,
        **kwargs: Any,
    ) -> BestRun | list[BestRun]:
        """Train `n_trials` times with values from `hp_space(trial)`, each in `output_dir/run-{n}`
        with a fresh model from `model_init`; returns the best `BestRun` (a list of them when
        `direction` is a list). `backend`: "optuna" (default) or "ray". `kwargs` go to the backend
        (optuna: `create_study` and `optimize`; ray: `tune.run`). See `ember.search`."""
        from ..search import hyperparameter_search

        return hyperparameter_search(
            self, hp_space, compute_objective, n_trials, direction, backend, hp_name, **kwargs
        )

    # -- end of a script -------------------------------------------------------------------------------
    def end(self) -> None:
        """Destroy the process group ember started (after a barrier); call once, after the last
        collective. Without it the group ends at interpreter exit; on one process nothing happens."""
        from ..strategy.env import teardown_process_group

        teardown_process_group()

    # -- the hub (ember/checkpoint/hub.py does the work) ----------------------------------------------
    def create_hub_api(self) -> Any:
        """The `huggingface_hub.HfApi` every push goes through; override it to send pushes elsewhere."""
        from ..checkpoint.hub import default_hub_api

        return default_hub_api()

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create (or find) the repo `args.hub_model_id` (default: output_dir's name under the token's
        user) on the main process; `private` applies only when it is created."""
        if self.is_world_process_zero():
            self.hub_model_id = self.hub.init_repo(token, private)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Save the model to output_dir, write its model card (`kwargs` go to `create_model_card`) and
        upload output_dir (no checkpoint folders) once the pushes in flight are done. Returns the
        `CommitInfo`, or with `blocking=False` a `Future`; None on other processes."""
        self._fire("on_push_begin")
        model_name = kwargs.pop("model_name", None)
        if model_name is None:
            model_name = (self.args.hub_model_id or Path(self.args.output_dir).name).split("/")[-1]
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.checkpointer.wait()
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        model_tags = getattr(self.strategy.unwrap(self.model), "model_tags", None)
        if model_tags:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [t for t in model_tags if t not in tags]
        self.create_model_card(model_name=model_name, **kwargs)
        revision = revision if revision is not None else self.args.hub_revision
        return self.hub.push_output_dir(commit_message, blocking, token, revision)

    def _finish_current_push(self) -> None:
        """transformers' name: wait for the Hub pushes in flight (their failures are already logged)."""
        self.hub.wait()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n", encoding="utf-8")
