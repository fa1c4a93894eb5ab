"""Throughput in the logs: tokens/s, samples/s and, when FLOPs and the device peak are known, MFU.

Counting happens on the CPU batch (shapes only), so it costs a few attribute reads per step and
never synchronises with the device. Rates are taken between two log lines, so they describe the
recent steps, not the average since start.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

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


def count_parameters(model: nn.Module) -> int:
    """Parameters a token's FLOPs scale with: the non-embedding ones when the model can tell
    (`num_parameters(exclude_embeddings=True)`, as transformers models), else all of them."""
    count = getattr(model, "num_parameters", None)
    if callable(count):
        try:
            return int(count(exclude_embeddings=True))
        except TypeError:
            pass
    return sum(p.numel() for p in model.parameters())


class Throughput:
    """Counts tokens and samples per step; `rates()` turns them into per-second figures at log time."""

    def __init__(self, flops_per_token: float | None, peak_flops: float | None, world_size: int) -> None:
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self.tokens = 0
        self.samples = 0
        self.since = time.perf_counter()

    def add(self, micro_batches: list[dict[str, Any]]) -> None:
        for batch in micro_batches:
            ids = batch.get("input_ids")
            if isinstance(ids, torch.Tensor):
                self.tokens += ids.numel()
                self.samples += ids.shape[0]
            else:
                labels = batch.get("labels")
                if isinstance(labels, torch.Tensor):
                    self.samples += labels.shape[0] if labels.dim() else 1

    def rates(self, all_reduce_sum: Any) -> dict[str, float]:
        now = time.perf_counter()
        elapsed, self.since = now - self.since, now
        counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64)
        if self.world_size > 1:
            counts = all_reduce_sum(counts)
        tokens, samples = float(counts[0]), float(counts[1])
        self.tokens = self.samples = 0
        if elapsed <= 0:
            return {}
        out = {"samples_per_second": round(samples / elapsed, 3)}
        if tokens:
            out["tokens_per_second"] = round(tokens / elapsed, 3)
            if self.flops_per_token and self.peak_flops:
                per_device = tokens / elapsed / self.world_size
                out["mfu"] = round(per_device * self.flops_per_token / self.peak_flops, 4)
        return out
