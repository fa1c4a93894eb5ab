"""The sortish sampler of `Seq2SeqTrainingArguments.sortish_sampler`: batches of similar source
lengths (less padding, so faster seq2seq steps) in an order that is still random.

Each epoch: the seeded shuffle, sorted by length within chunks of 50 batches (longest sample in the
first batch, so an out-of-memory shows on the first step: `_group_by_length`), then the optimizer
steps after the first are shuffled again with the same generator. The order stays a pure function
of (seed, epoch), so resuming is the O(1) slice `ResumableBatchSampler` does, and exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .samplers import MEGABATCH_MULT, ResumableBatchSampler, _group_by_length

__all__ = ["SortishBatchSampler"]


class SortishBatchSampler(ResumableBatchSampler):
    """`ResumableBatchSampler` whose epoch order is sortish (see the module docstring)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        lengths: Sequence[int],
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_batches: bool = True,
        seedable: bool = True,
    ) -> None:
        super().__init__(
            num_samples,
            batch_size,
            drop_last=drop_last,
            shuffle=True,
            seed=seed,
            lengths=lengths,
            rank=rank,
            world_size=world_size,
            even_batches=even_batches,
            seedable=seedable,
        )

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = self._epoch_generator(epoch)
        perm = torch.randperm(self.num_samples, generator=generator)
        assert self.lengths is not None
        perm = _group_by_length(perm, self.lengths, self.batch_size * MEGABATCH_MULT)
        # One optimizer step's samples on all ranks are `step` consecutive indices (rank r takes
        # every world_size-th), so whole steps move together; a short last one stays last, where
        # the ranks' wrap-around padding or drop_last expects it.
        step = self.batch_size * self.world_size
        full = perm.numel() // step
        if full <= 2:
            return perm
        moved = 1 + torch.randperm(full - 1, generator=generator)
        order = torch.cat([torch.zeros(1, dtype=torch.int64), moved])
        steps = perm[: full * step].view(full, step)[order].reshape(-1)
        return torch.cat([steps, perm[full * step :]])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sortish": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("sortish", False):
            raise ValueError(
                "cannot resume the data position: the checkpoint's sampler was not sortish and this run "
                "sets sortish_sampler=True; resume with the same setting, or set ignore_data_skip=True "
                "to restart the data order"
            )
        super().load_state_dict(state)
