"""Strategies: one object per way of placing the model on devices.

The trainer talks to a strategy only through the methods of `SingleDevice`; a multi-process
strategy overrides them. On one process every collective is the identity, so the loop calls them
unconditionally and pays nothing.

`build_strategy` reads the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK from torchrun)
and the arguments (`fsdp`, `deepspeed`): several processes without either mean DDP. The process
group is started here, once per process, and ended at interpreter exit (see `env`). Every
backend module is imported only when chosen, so `import ember` never loads DeepSpeed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .options import fsdp_enabled

if TYPE_CHECKING:
    from .single import SingleDevice, Strategy

__all__ = ["SingleDevice", "Strategy", "build_strategy", "fsdp_enabled"]


def __getattr__(name: str) -> Any:
    # Lazy, so TrainingArguments can validate its distributed fields without importing torch.
    if name in ("SingleDevice", "Strategy"):
        return getattr(importlib.import_module(".single", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_strategy(args: Any) -> Strategy:
    """The strategy for this process: one device unless launched as several processes."""
    from .env import launch_env
    from .single import SingleDevice

    env = launch_env()
    deepspeed = getattr(args, "deepspeed", None)
    fsdp = fsdp_enabled(getattr(args, "fsdp", None))
    if not (env.distributed or deepspeed or fsdp):
        return SingleDevice.from_args(args)
    from .env import init_process_group, pick_backend, pick_device

    device = pick_device(bool(getattr(args, "use_cpu", False)), env.local_rank)
    backend = pick_backend(device, getattr(args, "ddp_backend", None))
    init_process_group(env, backend, float(getattr(args, "ddp_timeout", 1800)))
    if deepspeed:
        from .deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy.build(args, env, device, backend)
    if fsdp:
        from .fsdp import FSDPStrategy

        return FSDPStrategy.build(args, env, device, backend)
    from .ddp import DDPStrategy

    return DDPStrategy.build(args, env, device, backend)
