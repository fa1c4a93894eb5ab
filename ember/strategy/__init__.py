"""Strategies: one object per way of placing the model on devices.

The trainer talks to a strategy only through the `Strategy` Protocol (base.py); `SingleDevice`
implements it for one process, where every collective is the identity (so the loop calls them
unconditionally and pays nothing), and the multi-process strategies extend it. The precision
object is built here, once, and handed to the strategy, which derives its own dtype settings
from it.

`build_strategy` reads the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK from torchrun)
and the arguments (`fsdp`, `deepspeed`): several processes without either mean DDP. The process
group is started here, once per process, and ended at interpreter exit (see `env`). Every
backend module is imported only when chosen, so `import ember` never loads DeepSpeed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..args.distributed import fsdp_enabled

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from .base import Strategy
    from .single import SingleDevice

__all__ = ["SingleDevice", "Strategy", "build_strategy", "fsdp_enabled"]

_LAZY = {"SingleDevice": ".single", "Strategy": ".base"}


def __getattr__(name: str) -> Any:
    # Lazy, so importing this package does not import torch.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_strategy(args: TrainingArguments) -> Strategy:
    """The strategy for this process (one device unless launched as several processes), holding
    the one precision object of the run. With loss_spike_zscore, a strategy that cannot roll a
    step back is refused here, before any step."""
    strategy = _build(args)
    if args.loss_spike_zscore is not None:
        reason = strategy.rollback_refusal()
        if reason is not None:
            raise ValueError(
                f"loss_spike_zscore={args.loss_spike_zscore} rolls spiking steps back in memory, "
                f"but {reason}."
            )
    return strategy


def _build(args: TrainingArguments) -> Strategy:
    from .env import launch_env, pick_device
    from .precision import build_precision
    from .single import SingleDevice

    env = launch_env()
    fsdp = fsdp_enabled(args.fsdp)
    if not (env.distributed or args.deepspeed or fsdp):
        device = pick_device(args.use_cpu)
        return SingleDevice(device, build_precision(args, device))
    from .env import init_process_group, pick_backend

    device = pick_device(args.use_cpu, env.local_rank)
    precision = build_precision(args, device)
    backend = pick_backend(device, args.ddp_backend)
    init_process_group(env, backend, float(args.ddp_timeout))
    if args.deepspeed:
        from .deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy.build(args, env, device, backend, precision)
    if fsdp:
        from .fsdp import FSDPStrategy

        return FSDPStrategy.build(args, env, device, backend, precision)
    from .ddp import DDPStrategy

    return DDPStrategy.build(args, env, device, backend, precision)
