"""What a run records: `log()` (the log history and the callbacks' `on_log`), the FLOPs count behind
`state.total_flos`, and the input tokens behind `state.num_input_tokens_seen`. Kept out of
trainer/trainer.py so that file stays about training; the loop calls these through `self`, so a subclass's
`log` or `floating_point_ops` is the one that runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..telemetry.throughput import count_parameters

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..callbacks.state import TrainerState
    from ..strategy.base import Strategy


class TrainerLogging:
    """Mixed into `Trainer`; relies on its `args`, `state`, `strategy`, `model_wrapped`, the FLOPs
    counted since the last `store_flos()` (`_current_flos`) and its `_fire`."""

    args: TrainingArguments
    state: TrainerState
    strategy: Strategy
    model_wrapped: nn.Module
    _current_flos: float

    if TYPE_CHECKING:  # defined by Trainer

        def _fire(self, event: str, **kwargs: Any) -> None: ...

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record `logs` in `state.log_history` and hand them to the callbacks' `on_log`.

        A step log's wall-clock figures (samples/s, tokens/s, MFU; set aside by the loop) go to
        `on_log` only: trackers and the progress bar show them, while the history keeps what two
        identical runs, or a resumed and an uninterrupted one, agree on.
        """
        transient = self.__dict__.pop("_transient_logs", None)
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.args.include_num_input_tokens_seen not in ("no", False):
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        self.state.log_history.append({**logs, "step": self.state.global_step})
        shown = {**logs, **transient} if transient else logs
        self._fire("on_log", logs=shown)

    def store_flos(self) -> None:
        """Add the FLOPs counted since the last call, summed over ranks, to `state.total_flos`."""
        flos = torch.tensor(self._current_flos, dtype=torch.float64)
        self.state.total_flos += float(self.strategy.all_reduce_sum(flos))
        self._current_flos = 0.0

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Forward + backward FLOPs of one micro-batch: 6 x parameters x tokens of the main input.

        transformers models count their non-embedding parameters; a plain module counts all of
        them. A batch without the model's main input (`main_input_name`, default input_ids)
        counts 0, as in transformers. Override this for a better estimate.
        """
        model = self.strategy.unwrap(self.model_wrapped)
        ids = inputs.get(getattr(model, "main_input_name", "input_ids"))
        if not isinstance(ids, torch.Tensor):
            return 0
        cached = self.__dict__.get("_flops_params")
        if cached is None or cached[0] is not model:
            cached = self.__dict__["_flops_params"] = (model, count_parameters(model))
        return 6 * ids.numel() * cached[1]

    def _count_input_tokens(self, micro_batches: list[dict[str, Any]]) -> int:
        """Tokens of one step's `input_ids` on all ranks (attended ones only with "non_padding")."""
        non_padding = self.args.include_num_input_tokens_seen == "non_padding"
        total = 0
        for batch in micro_batches:
            ids = batch.get("input_ids")
            if isinstance(ids, torch.Tensor):
                mask = batch.get("attention_mask")
                total += int(mask.sum()) if non_padding and isinstance(mask, torch.Tensor) else ids.numel()
        return int(self.strategy.all_reduce_sum(torch.tensor(total)))
