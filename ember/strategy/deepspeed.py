"""DeepSpeed ZeRO (stages 0-3) through the optional `deepspeed` package (`pip install ember[distributed]`).

The `deepspeed` argument is a dict or a JSON file, as for transformers; "auto" values are filled
from TrainingArguments (batch sizes, accumulation, clipping, bf16, bucket sizes from the model's
hidden size), and a concrete value that contradicts them is an error naming both. ember builds the
optimizer and scheduler from TrainingArguments as for every strategy; DeepSpeed wraps that
optimizer (ZeRO partitions its state). Optimizer or scheduler sections in the config are accepted
only when all their values are "auto".

Exact losses: DeepSpeed averages gradients over ranks and, unless told not to, divides the loss by
the accumulation steps. ember's loss is already normalised by the target count of the whole step
on all ranks, so backward passes `scale_wrt_gas=False` and multiplies by the world size, which the
average divides out again. The accumulation boundary is set explicitly per micro-batch, so
micro-batches skipped for having no targets do not shift DeepSpeed's counter.

Checkpoints stay pickle-free: the model is written full by rank 0 (gathered under ZeRO-3); with
ZeRO 1-3 each rank writes its partition (fp32 master weights and optimizer moments) through the
run's `CheckpointIO` (safetensors + JSON). Such a checkpoint resumes with the same stage and number
of ranks (DeepSpeed's partitions do not reshard; FSDP's do).

Rollback (loss spikes) goes through the engine's own state API, as DeepSpeed's `load_checkpoint`
does, but in memory: ZeRO 1/2 copy the module's state dict (every rank holds the full bit16
weights) and the ZeRO optimizer's `state_dict()` (this rank's fp32 master partition, moments,
loss scaler), and restore with `module.load_state_dict` + `optimizer.load_state_dict(...,
load_from_fp32_weights=True)`; ZeRO-3 copies only the optimizer's state dict (fp32 partitions and
moments, from which `load_state_dict` rebuilds the partitioned bit16 weights) between the
engine's checkpoint prologue and epilogue. The gradients of the dropped step, already reduced
into ZeRO's buffers, are cleared as DeepSpeed clears those of an overflowing step. Optimizer
state swapped to NVMe cannot be copied in memory: such a config is refused when the Trainer is
built with loss_spike_zscore.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..args.accelerator_config import rank_batch_size
from .env import LaunchEnv, collective
from .multi import MultiProcess, WriteStep

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..checkpoint.io import CheckpointIO
    from ..checkpoint.parts import Parts
    from .precision import Precision
    from .rollback import RollbackParts, RollbackSnapshot

logger = logging.getLogger("ember")

_AUTO = "auto"


def load_deepspeed_config(value: Any) -> dict[str, Any]:
    if isinstance(value, (str, Path)):
        with open(value, encoding="utf-8") as fh:
            return cast(dict[str, Any], json.load(fh))
    return json.loads(json.dumps(value))  # a deep copy that also rejects non-JSON values


class _Filler:
    """Fills "auto" values and collects contradictions with TrainingArguments."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.mismatches: list[str] = []

    def fill(self, dotted: str, value: Any, arg_name: str, must_match: bool = True) -> None:
        *parents, key = dotted.split(".")
        node = self.config
        for part in parents:
            if part not in node:
                return
            node = node[part]
        if key not in node or node[key] == _AUTO:
            node[key] = value
        elif must_match and node[key] != value:
            self.mismatches.append(f"{dotted}={node[key]!r} but {arg_name}={value!r}")


def resolve_config(
    args: TrainingArguments, world_size: int, hidden_size: int | None, dtype: torch.dtype | None
) -> dict[str, Any]:
    """The DeepSpeed config with every "auto" resolved; ValueError naming any contradiction.

    `dtype` is the run's compute dtype, `Precision.dtype` (None: fp32).
    """
    return fill_model_sizes(resolve_args(args, world_size, dtype), hidden_size)


_SIZED_BY_MODEL = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def fill_model_sizes(config: dict[str, Any], hidden_size: int | None) -> dict[str, Any]:
    """A copy of `config` whose "auto" bucket sizes come from the model's hidden size (DeepSpeed's
    defaults without one): the part of the config only known once the model is."""
    config = json.loads(json.dumps(config))
    zero = config.get("zero_optimization", {})
    for key, value in zip(
        _SIZED_BY_MODEL,
        (
            hidden_size * hidden_size if hidden_size else None,
            int(0.9 * hidden_size * hidden_size) if hidden_size else None,
            10 * hidden_size if hidden_size else None,
        ),
        strict=True,
    ):
        if zero.get(key) == _AUTO:
            if value is None:
                del zero[key]  # DeepSpeed's default
            else:
                zero[key] = value
    return config


def resolve_args(args: TrainingArguments, world_size: int, dtype: torch.dtype | None) -> dict[str, Any]:
    """The config with every "auto" that TrainingArguments decide filled in, and checked against
    them; the bucket sizes stay "auto" (see `fill_model_sizes`)."""
    config = load_deepspeed_config(args.deepspeed)
    f = _Filler(config)
    ga = args.gradient_accumulation_steps
    micro = rank_batch_size(args.per_device_train_batch_size, args, world_size)  # split_batches
    f.fill("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size")
    f.fill("gradient_accumulation_steps", ga, "gradient_accumulation_steps")
    f.fill("train_batch_size", micro * ga * world_size, "the global batch size")
    f.fill("gradient_clipping", float(args.max_grad_norm or 0.0), "max_grad_norm")
    f.fill("bf16.enabled", dtype == torch.bfloat16, "bf16")
    f.fill("fp16.enabled", dtype == torch.float16, "fp16")
    for section in ("optimizer", "scheduler"):
        _drop_auto_section(config, section)
    if f.mismatches:
        raise ValueError(
            "The `deepspeed` config contradicts TrainingArguments: "
            + "; ".join(f.mismatches)
            + '. Set those config values to "auto" (or equal to the arguments).'
        )
    if config.get("fp16", {}).get("enabled"):
        raise ValueError(
            "`deepspeed` with fp16 is not supported by ember yet (DeepSpeed's loss scaler and ember's "
            "would both act); use bf16=True, or run fp16 without deepspeed."
        )
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 2**31 - 1)
    return config


def _drop_auto_section(config: dict[str, Any], section: str) -> None:
    spec = config.get(section)
    if spec is None:
        return
    params = spec.get("params", {})
    concrete = {k: v for k, v in params.items() if v != _AUTO}
    if concrete:
        raise ValueError(
            f"The `deepspeed` config's {section} section sets {concrete}; ember builds the {section} from "
            "TrainingArguments (optim, learning_rate, adam_*, weight_decay, lr_scheduler_type, "
            "warmup_steps). "
            f'Set those values there and remove the section (or leave its values "auto").'
        )
    del config[section]


class _EngineOptimizer:
    """What the loop steps: `step()` runs the engine's step (reduce, clip, update, zero grads);
    param_groups are the wrapped optimizer's, which ember's scheduler adjusts."""

    def __init__(self, engine: Any, inner: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        self.engine, self.inner, self.grad_norm = engine, inner, grad_norm

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def step(self, closure: Any = None) -> None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            self.grad_norm.fill_(float(norm))

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # the engine's step clears gradients (or its partitions of them)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError(
            "The optimizer of a DeepSpeed engine is restored through the strategy "
            "(`load_checkpoint`, `restore_rollback`), which restores the engine's partitions with it."
        )

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()


class DeepSpeedStrategy(MultiProcess):
    """DeepSpeed's engine around the model and ember's optimizer. The engine is the model the
    Trainer holds (`parts.model`), so the strategy keeps no reference to it; it keeps the config
    (resolved from the arguments when built, sized to the model when the engine starts)."""

    def __init__(
        self,
        env: LaunchEnv,
        device: torch.device,
        backend: str,
        config: dict[str, Any],
        precision: Precision | None = None,
        save_only_model: bool = False,
    ) -> None:
        super().__init__(env, device, backend, precision)
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "`deepspeed` is set but the deepspeed package is not installed; install it with "
                "`pip install 'ember[distributed]'` (or `pip install deepspeed`)."
            ) from exc
        self.config = config
        self.save_only_model = save_only_model
        self._grad_norm = torch.full((), float("nan"))

    @classmethod
    def build(
        cls, args: TrainingArguments, env: LaunchEnv, device: torch.device, backend: str, precision: Precision
    ) -> DeepSpeedStrategy:
        config = resolve_args(args, env.world_size, precision.dtype)  # fails early on a bad config
        return cls(env, device, backend, config, precision, save_only_model=bool(args.save_only_model))

    @property
    def stage(self) -> int:
        return int(self.config.get("zero_optimization", {}).get("stage", 0))

    @property
    def shards_parameters(self) -> bool:  # type: ignore[override]
        # As transformers' is_deepspeed_zero3_enabled(): from the config (before train() builds the
        # engine the parameters are whole, and synced generation costs only a flag per step).
        return self.stage == 3

    def setup_model(self, model: nn.Module) -> nn.Module:
        return self.place_model(self.unwrap(model))

    def setup_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        import deepspeed

        if self.device.type == "cpu":
            # DeepSpeed's CPU shared-memory all-reduce is compiled with ninja on first use (minutes on a
            # small machine, and a compiler is needed); gloo does the same job.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if optimizer is None:
            raise ValueError("DeepSpeed needs an optimizer; the trainer builds one from TrainingArguments.")
        module = self.unwrap(model)
        hidden = getattr(getattr(module, "config", None), "hidden_size", None)
        self.config = fill_model_sizes(self.config, hidden)
        with collective("starting DeepSpeed", self.rank):
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.config)
        logger.info("ember: DeepSpeed ZeRO stage %d over %d ranks", self.stage, self.world_size)
        wrapped = _EngineOptimizer(engine, optimizer, self._grad_norm)
        return engine, cast(torch.optim.Optimizer, wrapped)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if _is_engine(model):
            model.set_gradient_accumulation_boundary(sync)  # type: ignore[operator]
        yield

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        with collective("the gradient reduction in backward", self.rank):
            _engine(model).backward(loss * self.world_size, scale_wrt_gas=False)

    @property
    def grad_norm_before_step(self) -> bool:
        # ZeRO computes the norm inside its own step: before it there is nothing to test.
        return self.stage == 0

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        if self.stage == 0:
            # Stage 0 holds full, already reduced gradients but reports no norm; clipping here first
            # leaves DeepSpeed's own clip (gradient_clipping) nothing to do.
            return super().clip_grad_norm(model, max_norm)
        # ZeRO clips inside its step (gradient_clipping); the norm is filled in then.
        return self._grad_norm

    # -- state ------------------------------------------------------------------------------------
    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.stage == 3 and _is_engine(model):
            with collective("gathering the ZeRO-3 model", self.rank):
                full = _engine(model)._zero3_consolidated_16bit_state_dict()
            return cast(dict[str, torch.Tensor], full or {})  # None on ranks other than 0
        return self.unwrap(model).state_dict()

    def optimizer_state_dict(self, model: nn.Module, optimizer: Any) -> dict[str, Any] | None:
        if self.stage == 0 and optimizer is not None:
            return cast(dict[str, Any], optimizer.state_dict())
        return None  # partitioned: every rank writes its own (see _extra_checkpoint_steps)

    def _extra_checkpoint_steps(self, parts: Parts, io: CheckpointIO) -> list[WriteStep]:
        if self.stage == 0 or self.save_only_model:
            return []
        from ..checkpoint.writer import snapshot_to_cpu

        state = snapshot_to_cpu(self._partition_state(_engine(parts.model)))
        rank = self.rank
        return [("writing its ZeRO partition", lambda tmp: io.write_partition(tmp, rank, state))]

    def _partition_state(self, engine: Any) -> dict[str, Any]:
        """This rank's fp32 master partition and optimizer moments (tensors + JSON-able values)."""
        zero = engine.optimizer
        if self.stage == 3:
            from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

            full = zero.state_dict()
            base, partitions = full[OPTIMIZER_STATE_DICT], list(full[FP32_FLAT_GROUPS])
        else:
            base, partitions = zero.optimizer.state_dict(), list(zero.single_partition_of_fp32_groups)
        return {
            "world_size": self.world_size,
            "stage": self.stage,
            "base_optimizer": base,
            "fp32_partitions": partitions,
            "dynamic_loss_scale": bool(getattr(zero, "dynamic_loss_scale", False)),
            "overflow": bool(getattr(zero, "overflow", False)),
        }

    def load_model_weights(self, model: nn.Module, folder: Path) -> None:
        if self.stage == 3:
            raise NotImplementedError(
                "ember cannot load full weights into a ZeRO-3 engine yet (load_best_model_at_end); "
                "load the best checkpoint's model.safetensors after training instead."
            )
        super().load_model_weights(model, folder)

    def load_checkpoint(self, parts: Parts, io: CheckpointIO, folder: Path) -> None:
        engine = _engine(parts.model)
        if self.stage != 3:  # ZeRO-3's weights come back from the fp32 partitions below
            self.load_model_weights(engine, folder)
        if self.stage == 0:
            saved_optimizer = io.read_optimizer(folder) if parts.optimizer is not None else None
            if saved_optimizer is not None:
                engine.optimizer.load_state_dict(saved_optimizer)
            return
        saved = io.read_partition(folder, self.rank, map_location=str(self.device))
        if int(saved["world_size"]) != self.world_size or int(saved["stage"]) != self.stage:
            raise ValueError(
                f"{folder} was written by ZeRO-{saved['stage']} on {saved['world_size']} ranks; resume it "
                "with "
                "the same stage and number of ranks."
            )
        zero = engine.optimizer
        if self.stage == 3:
            from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT

            mine = {
                LOSS_SCALER: zero.loss_scaler,
                "dynamic_loss_scale": saved["dynamic_loss_scale"],
                "overflow": saved["overflow"],
                OPTIMIZER_STATE_DICT: saved["base_optimizer"],
                FP32_FLAT_GROUPS: saved["fp32_partitions"],
            }
            # Restores the fp32 partitions, the moments, and the model's partitions from them.
            zero.load_state_dict([mine] * self.world_size)
            return
        zero.optimizer.load_state_dict(saved["base_optimizer"])
        for current, theirs in zip(zero.single_partition_of_fp32_groups, saved["fp32_partitions"]):
            current.data.copy_(theirs)

    # -- rollback ---------------------------------------------------------------------------------
    def rollback_refusal(self) -> str | None:
        zero = self.config.get("zero_optimization", {})
        swapped = [
            key
            for key in ("offload_optimizer", "offload_param")
            if isinstance(zero.get(key), dict) and zero[key].get("device") == "nvme"
        ]
        if swapped:
            return (
                f"the DeepSpeed config swaps {' and '.join(swapped)} to NVMe (zero_optimization.{swapped[0]}"
                ".device='nvme'), whose state DeepSpeed cannot copy in memory; use device 'cpu' or 'none', "
                "or unset loss_spike_zscore"
            )
        return None

    def snapshot_for_rollback(self, parts: RollbackParts) -> RollbackSnapshot:
        """This rank's share, through the engine's state API (see the module docstring)."""
        from .rollback import clone_state, snapshot_rest

        engine = _engine(parts.model)
        held: dict[str, Any] = {"optimizer": clone_state(engine.optimizer.state_dict())}
        if self.stage != 3:  # ZeRO-3's bit16 weights are rebuilt from the fp32 partitions
            held["module"] = clone_state(engine.module.state_dict())
        return snapshot_rest(parts, held)

    def restore_rollback(self, parts: RollbackParts, snapshot: RollbackSnapshot) -> None:
        from .rollback import clone_state, restore_rest

        engine = _engine(parts.model)
        zero = engine.optimizer
        saved = clone_state(snapshot.held["optimizer"])
        with collective("rolling the DeepSpeed engine back", self.rank):
            if self.stage == 0:
                engine.module.load_state_dict(clone_state(snapshot.held["module"]))
                zero.load_state_dict(saved)
            elif self.stage == 3:
                _clear_zero_gradients(zero, self.stage)
                zero.checkpoint_event_prologue()  # every parameter partitioned, as load_state_dict wants
                zero.load_state_dict([saved] * self.world_size, load_optimizer_states=True)
                zero.checkpoint_event_epilogue()  # the persistent (small) parameters gathered again
            else:
                _clear_zero_gradients(zero, self.stage)
                engine.module.load_state_dict(clone_state(snapshot.held["module"]))
                zero.load_state_dict(
                    [saved] * self.world_size, load_optimizer_states=True, load_from_fp32_weights=True
                )
        restore_rest(parts, snapshot)


def _is_engine(model: nn.Module) -> bool:
    from deepspeed.runtime.engine import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def _engine(model: nn.Module) -> Any:
    if not _is_engine(model):
        raise TypeError(
            f"expected the DeepSpeed engine that setup_optimizer returned, got {type(model).__name__}: "
            "pass the Trainer's model_wrapped"
        )
    return model


def _clear_zero_gradients(zero: Any, stage: int) -> None:
    """Forget the gradients a dropped step reduced into ZeRO's buffers, as DeepSpeed does for a
    step that overflowed (it never applies them either)."""
    if stage == 3:
        zero._overflow_clean_up(None)
        return
    zero.zero_grad(set_to_none=True)
    zero._release_preflattened_grad_buffers()
    if zero.cpu_offload:
        zero.reset_cpu_buffers()
        return
    for key in list(zero.averaged_gradients.keys()):
        zero.averaged_gradients[key] = None
        zero.all_grad_tensors[key] = None
