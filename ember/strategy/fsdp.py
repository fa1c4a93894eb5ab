"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded
over the ranks; each transformer block is gathered just before it runs and freed after.

Exact losses: FSDP2 divides reduced gradients by the world size; its divide factor is set to 1
(and its reductions to a plain SUM) so gradients are summed, like the DDP strategy's hook (see
ddp.py for why a sum is right).

Checkpoints keep the sharding: every rank writes its shards through torch.distributed.checkpoint
(pickle-free, see checkpoint/sharded.py) by way of the run's `CheckpointIO`, and the model is also
written consolidated on rank 0 as `save_pretrained` does, so `from_pretrained(checkpoint)` works
for inference. Rollback snapshots are the base strategy's: the module's and optimizer's own state
dicts, which hold this rank's DTensor shards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .env import LaunchEnv, collective
from .multi import MultiProcess, WriteStep

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..checkpoint.io import CheckpointIO
    from ..checkpoint.parts import Parts
    from .precision import Precision

logger = logging.getLogger("ember")


class FSDPStrategy(MultiProcess):
    """One process per device; the model is sharded with `fully_shard` over a 1-D device mesh."""

    shards_parameters = True

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
        self.config = dict(config)
        # The consolidated model.safetensors is then the whole checkpoint: no sharded state.
        self.save_only_model = save_only_model
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(device.type, (self.world_size,))

    @classmethod
    def build(
        cls, args: TrainingArguments, env: LaunchEnv, device: torch.device, backend: str, precision: Precision
    ) -> FSDPStrategy:
        # A dict once the arguments are validated (a JSON path is read then).
        config = args.fsdp_config if isinstance(args.fsdp_config, dict) else {}
        if config.get("cpu_offload") and device.type == "cpu":
            raise ValueError(
                "`fsdp_config['cpu_offload']` moves parameters off a GPU, but this run is on the CPU; "
                "remove it (or train on GPUs)."
            )
        return cls(env, device, backend, config, precision, save_only_model=bool(args.save_only_model))

    # -- model ------------------------------------------------------------------------------------
    def place_model(self, model: nn.Module) -> nn.Module:
        """Shard the model: on this strategy, placing it is sharding it (see `setup_model`)."""
        return self.setup_model(model)

    def setup_model(self, model: nn.Module) -> nn.Module:
        """Shard block by block. The full model never lands on the device: `fully_shard` moves
        each block's tensors there as it shards them, and a model built on the meta device is
        materialised shard by shard afterwards (`_materialise`)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

        if isinstance(model, FSDPModule):  # already sharded (at construction, or a second train())
            return model
        offload = bool(self.config.get("cpu_offload"))
        if self.config.get("activation_checkpointing"):
            from ..models.pipeline import enable_activation_checkpointing

            # The same path as the activation_checkpointing argument, on FSDP's own blocks.
            enable_activation_checkpointing(model, blocks=self._blocks(model))
        kwargs: dict[str, Any] = {
            "mesh": self._shard_mesh(),
            "reshard_after_forward": bool(self.config.get("reshard_after_forward", True)),
            "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
        }
        policy = self._mixed_precision()
        if policy is not None:
            kwargs["mp_policy"] = policy
        blocks = self._blocks(model)
        with collective("sharding the model", self.rank):
            for block in blocks:
                fully_shard(block, **kwargs)
            fully_shard(model, **kwargs)
        _materialise(model, torch.device("cpu") if offload else self.device)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                # A plain SUM (no pre-multiplied sum, which gloo lacks); with factor 1 nothing is divided.
                module.set_force_sum_reduction_for_comms(True)
        logger.info(
            "ember: FSDP2 over %d ranks, %d blocks sharded separately", self._shard_mesh().size(), len(blocks)
        )
        return model

    def _shard_mesh(self) -> Any:
        """The mesh `fully_shard` shards over: every rank here; the data-parallel dims under TP."""
        return self.mesh

    def _mixed_precision(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = self.precision.dtype
        if dtype is None:
            return None
        reduce = self.config.get("mixed_precision_reduce_dtype", "float32")
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=getattr(torch, reduce))

    def _blocks(self, model: nn.Module) -> list[nn.Module]:
        """Submodules that get their own `fully_shard`: the unit of gather/free (auto_wrap_policy)."""
        policy = self.config.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
        if policy == "NO_WRAP":
            return []
        if policy == "SIZE_BASED_WRAP":
            return _blocks_by_size(model, int(self.config.get("min_num_params", 0)) or 100_000_000)
        names = self.config.get("transformer_layer_cls_to_wrap") or list(
            getattr(model, "_no_split_modules", None) or []
        )
        if names:
            found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
            missing = set(names) - {type(m).__name__ for m in found}
            if self.config.get("transformer_layer_cls_to_wrap") and missing:
                raise ValueError(
                    f"`fsdp_config['transformer_layer_cls_to_wrap']` names {sorted(missing)}, which the "
                    "model "
                    "does not contain; use class names of its blocks (e.g. 'GPT2Block')."
                )
            if found:
                return found
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
        return list(largest) if largest is not None else []

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard changes the module in place

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        setter = getattr(model, "set_requires_gradient_sync", None)
        if setter is not None:
            setter(sync)
        yield

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        params = [p for p in model.parameters() if p.grad is not None]
        with collective("clipping gradients", self.rank):
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            return norm.full_tensor() if isinstance(norm, DTensor) else norm

    # -- state ------------------------------------------------------------------------------------
    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with collective("gathering the model", self.rank):
            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return cast(dict[str, torch.Tensor], full)

    def load_model_weights(self, model: nn.Module, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from ..checkpoint.model import load_model_files

        def apply(full: dict[str, torch.Tensor]) -> None:
            with collective("loading the model", self.rank):
                set_model_state_dict(
                    model,
                    cast(dict[str, Any], full),
                    options=StateDictOptions(full_state_dict=True, strict=False),
                )

        load_model_files(model, folder, apply=apply)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        return None  # written sharded by `_extra_checkpoint_steps`

    def load_checkpoint(self, parts: Parts, io: CheckpointIO, folder: Path) -> None:
        if not io.has_sharded(folder):
            raise ValueError(
                f"{folder} holds no sharded state (it was not written under fsdp), so FSDP cannot resume "
                "its optimizer from it. Resume it without fsdp, or start from its weights with "
                "from_pretrained."
            )
        with collective("loading the sharded checkpoint", self.rank):
            io.read_sharded(folder, parts.model, parts.optimizer, process_group=self._checkpoint_group)

    def _extra_checkpoint_steps(self, parts: Parts, io: CheckpointIO) -> list[WriteStep]:
        from ..checkpoint.sharded import sharded_state

        if self.save_only_model:
            return []
        with collective("collecting the sharded state", self.rank):
            state = io.detach_sharded(sharded_state(parts.model, parts.optimizer))

        def write(tmp: Path) -> None:
            io.write_sharded(tmp, state, self.is_main, self._checkpoint_group)

        return [("writing the sharded state", write)]


def _materialise(model: nn.Module, device: torch.device) -> None:
    """Give a model built on the meta device real (sharded) storage and its initial values.

    Only this rank's shards are allocated. Values come from the model's own initialisation:
    `init_weights()` for a transformers model, else each submodule's `reset_parameters()`.
    """
    if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return
    model.to_empty(device=device)
    init_weights = getattr(model, "init_weights", None)
    with torch.no_grad():
        if callable(init_weights):
            init_weights()
            return
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def _blocks_by_size(model: nn.Module, min_params: int) -> list[nn.Module]:
    """Deepest-first: a module whose parameters not yet in a chosen block reach `min_params`."""
    chosen: list[nn.Module] = []
    covered: set[int] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            visit(child)
        if module is model:
            return
        own = [p for p in module.parameters() if id(p) not in covered]
        if sum(p.numel() for p in own) >= min_params:
            chosen.append(module)
            covered.update(id(p) for p in own)

    visit(model)
    return chosen
