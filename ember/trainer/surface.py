"""Small members of transformers' Trainer that scripts and subclasses call, kept out of trainer/trainer.py
so that file stays about training. Each one does what its transformers namesake does, in ember terms;
`docs/compatibility.md` ("Trainer methods") lists the ones left out and why."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..callbacks.state import TrainerState
    from ..search import BestRun


class TrainerSurface:
    """Mixed into `Trainer`; relies on its `args`, `precision`, `strategy`, `label_shift`, `state`,
    `model` and `optimizer`."""

    args: Any
    precision: Any
    strategy: Any
    label_shift: bool
    state: TrainerState
    model: nn.Module
    optimizer: torch.optim.Optimizer | None

    #: Set while hyperparameter_search runs ("optuna"), and the objective of the current trial.
    hp_search_backend: str | None = None
    objective: Any = None

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
        return 1  # context parallelism is refused when parallelism_config asks for it

    def get_sp_size(self) -> int:
        return 1  # as is sequence parallelism (accelerate's sp_size)

    def get_total_train_batch_size(self, args: Any) -> int:
        """Samples per optimizer step on all ranks: per-device batch x accumulation x data-parallel ranks."""
        per_rank = args.per_device_train_batch_size * args.gradient_accumulation_steps
        return per_rank * self.strategy.dp_world_size

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device | None = None
    ) -> tuple[list[Any], torch.Tensor | None]:
        """The next `num_batches` micro-batches and their target count on all ranks (the loss divisor)."""
        from ..engine.loss import count_targets

        batches: list[Any] = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        total = torch.stack([count_targets(b, self.label_shift) for b in batches]).sum()
        return batches, self.strategy.all_reduce_sum(total.to(device or self.strategy.device))

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
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

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

    # -- the hub ---------------------------------------------------------------------------------------
    def push_to_hub(
        self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs: Any
    ) -> Any:
        raise RuntimeError(
            "ember does not push to the Hugging Face Hub. Save the model with trainer.save_model(folder), "
            "then upload that folder with huggingface_hub.upload_folder(repo_id=..., folder_path=folder)."
        )

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        raise RuntimeError(
            "ember does not create Hub repositories; create one with huggingface_hub.create_repo(...) and "
            "upload trainer.save_model's folder with huggingface_hub.upload_folder."
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n", encoding="utf-8")
