"""Throughput in the logs: tokens/s, samples/s and, when FLOPs and the device peak are known, MFU.

Three token counts, because padding makes them differ: `tokens_per_second` counts every input
position (padding included, as transformers' figure does); `real_tokens_per_second` counts the
target tokens the loss trains on (labels != -100 after the causal shift; without token labels,
the non-padding inputs); MFU counts the non-padding inputs (attention_mask), since compute spent
on padding is not model work. Packed rows (`position_ids` restarting, no attention mask) count one
sample per restart.

Counting happens on the CPU batch (shapes only), so it costs a few attribute reads per step and
never synchronises with the device. Rates are taken between two log lines, so they describe the
recent steps, not the average since start.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..engine.loss import count_targets

# Dense peak FLOP/s per device for bf16/fp16 matmuls (and tf32 for fp32 training), by name fragment.
# Sources: vendor datasheets (SXM parts; PCIe parts are lower, pass device_peak_flops for those).
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 494.5e12},
    "H100": {"bf16": 989e12, "fp32": 494.5e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "A10G": {"bf16": 125e12, "fp32": 62.5e12},
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """The table's peak for this CUDA device, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks["bf16" if precision in ("bf16", "fp16") else "fp32"]
    return None


def model_flops_per_token(model: nn.Module) -> float | None:
    """6·N (forward + backward) for the non-embedding parameters, if the model exposes them.

    A model may define `flops_per_token` (number or method) itself; transformers models expose
    `num_parameters(exclude_embeddings=True)`.
    """
    own = getattr(model, "flops_per_token", None)
    if own is not None:
        return float(own() if callable(own) else own)
    count = getattr(model, "num_parameters", None)
    if callable(count):
        try:
            return 6.0 * float(count(exclude_embeddings=True))
        except TypeError:
            return None
    return None


class Throughput:
    """Counts tokens and samples per step; `rates()` turns them into per-second figures at log time."""

    def __init__(
        self,
        flops_per_token: float | None,
        peak_flops: float | None,
        world_size: int,
        label_shift: bool = False,
    ) -> None:
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self.label_shift = label_shift
        self.tokens = self.real_tokens = self.model_tokens = 0
        self.samples = 0
        self.since = time.perf_counter()

    def add(self, micro_batches: list[dict[str, Any]]) -> None:
        for batch in micro_batches:
            ids = batch.get("input_ids")
            if isinstance(ids, torch.Tensor):
                mask = batch.get("attention_mask")
                nonpad = int(mask.sum()) if isinstance(mask, torch.Tensor) else ids.numel()
                self.tokens += ids.numel()
                self.model_tokens += nonpad
                self.real_tokens += self._targets(batch, nonpad)
                self.samples += _samples(batch, ids)
            else:
                labels = batch.get("labels")
                if isinstance(labels, torch.Tensor):
                    self.samples += labels.shape[0] if labels.dim() else 1

    def _targets(self, batch: dict[str, Any], nonpad: int) -> int:
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and not labels.is_floating_point():
            return int(count_targets(batch, self.label_shift))
        return nonpad

    def rates(self, all_reduce_sum: Any) -> dict[str, float]:
        now = time.perf_counter()
        elapsed, self.since = now - self.since, now
        counts = torch.tensor(
            [self.tokens, self.samples, self.real_tokens, self.model_tokens], dtype=torch.float64
        )
        if self.world_size > 1:
            counts = all_reduce_sum(counts)
        tokens, samples, real, model_tokens = (float(c) for c in counts)
        self.tokens = self.samples = self.real_tokens = self.model_tokens = 0
        if elapsed <= 0:
            return {}
        out = {"samples_per_second": round(samples / elapsed, 3)}
        if tokens:
            out["tokens_per_second"] = round(tokens / elapsed, 3)
            out["real_tokens_per_second"] = round(real / elapsed, 3)
            if self.flops_per_token and self.peak_flops:
                per_device = model_tokens / elapsed / self.world_size
                out["mfu"] = round(per_device * self.flops_per_token / self.peak_flops, 4)
        return out


def _samples(batch: dict[str, Any], ids: torch.Tensor) -> int:
    """Rows, or for packed rows (restarting position_ids, no attention mask) the examples in them."""
    positions = batch.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() == 2 and batch.get("attention_mask") is None:
        return int((positions == 0).sum())
    return int(ids.shape[0])
