"""Small members of transformers' Trainer that scripts and subclasses call, kept out of trainer.py
so that file stays about training. Each one does what its transformers namesake does, in ember terms;
`docs/compatibility.md` ("Trainer methods") lists the ones left out and why."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .outputs import EvalLoopOutput


class TrainerSurface:
    """Mixed into `Trainer`; relies on its `args`, `precision`, `strategy` and `label_shift`."""

    args: Any
    precision: Any
    strategy: Any
    label_shift: bool

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
        return 1  # ember has no tensor parallelism

    def get_cp_size(self) -> int:
        return 1  # nor context parallelism

    def get_sp_size(self) -> int:
        return 1  # nor sequence parallelism

    def get_total_train_batch_size(self, args: Any) -> int:
        """Samples per optimizer step on all ranks: per-device batch x accumulation x data-parallel ranks."""
        per_rank = args.per_device_train_batch_size * args.gradient_accumulation_steps
        return per_rank * self.strategy.dp_world_size

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device | None = None
    ) -> tuple[list[Any], torch.Tensor | None]:
        """The next `num_batches` micro-batches and their target count on all ranks (the loss divisor)."""
        from .loss import count_targets

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
        from .optim import get_decay_parameter_names

        return get_decay_parameter_names(model)

    # -- evaluation ------------------------------------------------------------------------------------
    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The loop behind evaluate() and predict(), for subclasses that call it directly."""
        from .evaluation import evaluation_loop

        with torch.no_grad():
            return evaluation_loop(
                self,  # type: ignore[arg-type]
                dataloader,
                description,
                prediction_loss_only,
                ignore_keys,
                metric_key_prefix,
            )

    # -- end of a script -------------------------------------------------------------------------------
    def end(self) -> None:
        """Destroy the process group ember started (after a barrier); call once, after the last
        collective. Without it the group ends at interpreter exit; on one process nothing happens."""
        from .distributed.env import teardown_process_group

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
