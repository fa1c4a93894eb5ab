"""`MetricsRecorder`, the Trainer's collaborator for what a run records besides `TrainerState`: the
FLOPs counted since the last `store_flos()`, a step log's wall-clock rates (set aside for `on_log`
only), and the parameter count behind the FLOPs estimate. The Trainer's `log`, `store_flos` and
`floating_point_ops` are thin methods over it, so a subclass overriding them still changes what runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..utils import count_parameters

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..callbacks.state import TrainerState
    from ..strategy.base import Strategy


class MetricsRecorder:
    """The log history's side channel and the FLOPs count; holds no reference to the Trainer."""

    def __init__(self) -> None:
        self.flos_since_store = 0.0
        self._rates: dict[str, float] | None = None
        self._params: tuple[nn.Module, int] | None = None

    def set_aside(self, rates: dict[str, float]) -> None:
        """Wall-clock figures (samples/s, tokens/s, MFU) for the next `log()` to show but not keep."""
        self._rates = rates

    def record(
        self, args: TrainingArguments, state: TrainerState, logs: dict[str, float]
    ) -> dict[str, float]:
        """Append `logs` (with epoch and tokens seen) to `state.log_history`; return what `on_log` shows.

        The history keeps what two identical runs, or a resumed and an uninterrupted one, agree on;
        the rates set aside for this log go to the callbacks only.
        """
        if state.epoch is not None:
            logs["epoch"] = state.epoch
        if args.include_num_input_tokens_seen not in ("no", False):
            logs["num_input_tokens_seen"] = state.num_input_tokens_seen
        state.log_history.append({**logs, "step": state.global_step})
        rates, self._rates = self._rates, None
        return {**logs, **rates} if rates else logs

    def store_flos(self, state: TrainerState, strategy: Strategy) -> None:
        """Add the FLOPs counted since the last call, summed over ranks, to `state.total_flos`."""
        flos = torch.tensor(self.flos_since_store, dtype=torch.float64)
        state.total_flos += float(strategy.all_reduce_sum(flos))
        self.flos_since_store = 0.0

    def floating_point_ops(self, model: nn.Module, inputs: dict[str, Any]) -> int:
        """6 x parameters x tokens of the model's main input (0 without it), as transformers counts."""
        ids = inputs.get(getattr(model, "main_input_name", "input_ids"))
        if not isinstance(ids, torch.Tensor):
            return 0
        if self._params is None or self._params[0] is not model:
            self._params = (model, count_parameters(model, exclude_embeddings=True))
        return 6 * ids.numel() * self._params[1]


def count_input_tokens(
    args: TrainingArguments, strategy: Strategy, micro_batches: list[dict[str, Any]]
) -> int:
    """Tokens of one step's `input_ids` on all ranks (attended ones only with "non_padding")."""
    non_padding = args.include_num_input_tokens_seen == "non_padding"
    total = 0
    for batch in micro_batches:
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            mask = batch.get("attention_mask")
            total += int(mask.sum()) if non_padding and isinstance(mask, torch.Tensor) else ids.numel()
    return int(strategy.all_reduce_sum(torch.tensor(total)))
