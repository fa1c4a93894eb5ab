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
ZeRO 1-3 each rank writes its partition (fp32 master weights and optimizer moments) as safetensors
+ JSON into `deepspeed-rank-<r>.*`. Such a checkpoint resumes with the same stage and number of
ranks (DeepSpeed's partitions do not reshard; FSDP's do).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .env import LaunchEnv, collective
from .multi import MultiProcess

if TYPE_CHECKING:
    from ..args import TrainingArguments
    from ..precision import Precision

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
    config = load_deepspeed_config(args.deepspeed)
    f = _Filler(config)
    ga = args.gradient_accumulation_steps
    f.fill("train_micro_batch_size_per_gpu", args.per_device_train_batch_size, "per_device_train_batch_size")
    f.fill("gradient_accumulation_steps", ga, "gradient_accumulation_steps")
    f.fill("train_batch_size", args.per_device_train_batch_size * ga * world_size, "the global batch size")
    f.fill("gradient_clipping", float(args.max_grad_norm or 0.0), "max_grad_norm")
    f.fill("bf16.enabled", dtype == torch.bfloat16, "bf16")
    f.fill("fp16.enabled", dtype == torch.float16, "fp16")
    zero = config.get("zero_optimization", {})
    for key, value in (
        ("reduce_bucket_size", hidden_size * hidden_size if hidden_size else None),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size) if hidden_size else None),
        ("stage3_param_persistence_threshold", 10 * hidden_size if hidden_size else None),
    ):
        if zero.get(key) == _AUTO:
            if value is None:
                del zero[key]  # DeepSpeed's default
            else:
                zero[key] = value
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

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()


class DeepSpeedStrategy(MultiProcess):
    """DeepSpeed's engine around the model and ember's optimizer."""

    def __init__(
        self,
        env: LaunchEnv,
        device: torch.device,
        backend: str,
        args: TrainingArguments,
        precision: Precision | None = None,
    ) -> None:
        super().__init__(env, device, backend, precision)
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "`deepspeed` is set but the deepspeed package is not installed; install it with "
                "`pip install 'ember[distributed]'` (or `pip install deepspeed`)."
            ) from exc
        self.args = args
        self.config: dict[str, Any] = {}
        self.engine: Any = None
        self._grad_norm = torch.full((), float("nan"))

    @classmethod
    def build(
        cls, args: TrainingArguments, env: LaunchEnv, device: torch.device, backend: str, precision: Precision
    ) -> DeepSpeedStrategy:
        resolve_config(args, env.world_size, None, precision.dtype)  # fail early on a bad config
        return cls(env, device, backend, args, precision)

    @property
    def stage(self) -> int:
        return int(self.config.get("zero_optimization", {}).get("stage", 0))

    @property
    def shards_parameters(self) -> bool:  # type: ignore[override]
        # Parameters are partitioned once the engine exists (train() builds it) under ZeRO-3.
        return self.engine is not None and self.stage == 3

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
        self.config = resolve_config(self.args, self.world_size, hidden, self.precision.dtype)
        with collective("starting DeepSpeed", self.rank):
            engine, ds_optimizer, _, _ = deepspeed.initialize(
                model=module, optimizer=optimizer, config=self.config
            )
        self.engine = engine
        logger.info("ember: DeepSpeed ZeRO stage %d over %d ranks", self.stage, self.world_size)
        wrapped = _EngineOptimizer(engine, optimizer, self._grad_norm)
        return engine, cast(torch.optim.Optimizer, wrapped)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        with collective("the gradient reduction in backward", self.rank):
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

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
        if self.engine is not None and self.stage == 3:
            with collective("gathering the ZeRO-3 model", self.rank):
                full = self.engine._zero3_consolidated_16bit_state_dict()
            return cast(dict[str, torch.Tensor], full or {})  # None on ranks other than 0
        return self.unwrap(model).state_dict()

    def optimizer_state_dict(self, model: nn.Module, optimizer: Any) -> dict[str, Any] | None:
        if self.stage == 0 and optimizer is not None:
            return cast(dict[str, Any], optimizer.state_dict())
        return None  # partitioned: every rank writes its own (see _extra_checkpoint_steps)

    def _extra_checkpoint_steps(self, final_dir: Path) -> list[tuple[str, Callable[[Path], None]]]:
        if self.stage == 0 or self.args.save_only_model:
            return []
        from ..checkpoint.state_io import save_state
        from ..checkpoint.writer import snapshot_to_cpu

        state = snapshot_to_cpu(self._partition_state())
        name = f"deepspeed-rank-{self.rank}"
        return [("writing its ZeRO partition", lambda tmp: save_state(state, tmp, name))]

    def _partition_state(self) -> dict[str, Any]:
        """This rank's fp32 master partition and optimizer moments (tensors + JSON-able values)."""
        zero = self.engine.optimizer
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

    def load_model_and_optimizer(self, model: nn.Module, optimizer: Any, folder: Path) -> None:
        from ..checkpoint.state_io import load_state

        if self.stage != 3:  # ZeRO-3's weights come back from the fp32 partitions below
            self.load_model_weights(model, folder)
        if self.stage == 0:
            if optimizer is not None and (folder / "optimizer.json").exists():
                self.engine.optimizer.load_state_dict(load_state(folder, "optimizer"))
            return
        name = f"deepspeed-rank-{self.rank}"
        if not (folder / f"{name}.json").exists():
            raise ValueError(
                f"{folder} has no ZeRO partition for rank {self.rank} ({name}.json): it was written with "
                "another strategy or number of ranks; DeepSpeed checkpoints resume with the same world size."
            )
        saved = load_state(folder, name, map_location=str(self.device))
        if int(saved["world_size"]) != self.world_size or int(saved["stage"]) != self.stage:
            raise ValueError(
                f"{folder} was written by ZeRO-{saved['stage']} on {saved['world_size']} ranks; resume it "
                "with "
                "the same stage and number of ranks."
            )
        zero = self.engine.optimizer
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
