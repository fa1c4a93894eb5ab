"""Layouts on a named device mesh, from `parallelism_config`: tensor parallelism (TP) alone, FSDP2 x
TP, hybrid sharding (HSDP: dp_replicate x dp_shard) and replicated data parallelism x TP.

One `DeviceMesh` with the dimensions (dp_replicate, dp_shard, tp), row-major, so the ranks of one
TP group are neighbours (on one node, where TP's per-layer collectives belong). The model pipeline
runs in the issue's order: adapters -> activation checkpointing -> compile (models/pipeline.py),
then here: parallelize (`parallelize_module` with the model's own TP plan) -> shard (`fully_shard`
over the data-parallel dimensions).

Ranks: the ranks of one TP group compute on the same batch, so the data-parallel rank is this
rank's position on the (dp_replicate, dp_shard) plane and every data-derived sum (target counts,
logged losses, evaluation rows) runs over the data-parallel group only (MultiProcess._data_group).

Exact losses: as in ddp.py and fsdp.py, gradients are summed over data-parallel ranks, never
averaged; within a TP group DTensor's own collectives make each shard's gradient exact.

Checkpoints are those of FSDP (fsdp.py, sharded.py): DTensor shards through DCP, resharded on load
for any other layout or one process; `save_model` gathers one consolidated folder.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from ..engine.loss import shifts_labels
from .context import check_cp_model, clear_shard, shard_batch, use_cp_attention
from .env import LaunchEnv, collective
from .fsdp import FSDPStrategy
from .multi import MultiProcess

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from .precision import Precision

logger = logging.getLogger("ember")

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")

# transformers' style names (its tensor_parallel.py registry) that map onto torch's own styles.
# "replicated*" leaves the module whole on every TP rank: with inputs replicated, its gradient is
# the same on every rank, so nothing needs reducing.
_REPLICATED = ("replicated", "replicated_with_grad_allreduce")
_REFUSED_REASON = {
    "sequence_parallel": "sequence parallelism needs every neighbouring layer's plan to shard the "
    "sequence dimension too (torch's SequenceParallel), which the transformers plans do not state",
}


def tp_style(name: str, where: str) -> Any:
    """torch.distributed.tensor.parallel style for a transformers style name, or None (replicated)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles: dict[str, Callable[[], Any]] = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        # The full output on every rank: the head, whose logits the loss reads whole.
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
        "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
        "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
        # nn.Embedding: rowwise shards the vocabulary (the partial sums are all-reduced), colwise the
        # embedding dimension (gathered).
        "embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
        "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
        "embedding_colwise": lambda: ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    }
    if name in _REPLICATED:
        return None
    if name in styles:
        return styles[name]()
    reason = _REFUSED_REASON.get(name, "ember maps only " + ", ".join([*styles, *_REPLICATED]))
    raise ValueError(
        f"The tensor-parallel plan gives {where!r} the style {name!r}, which ember cannot apply: {reason}. "
        "Pass a plan without it as parallelism_config['tp_plan']."
    )


def is_tp_distributed(model: nn.Module) -> bool:
    """Whether the model's parameters are already DTensors (e.g. `from_pretrained(tp_plan="auto")`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def model_tp_plan(model: nn.Module, user_plan: Mapping[str, str] | None) -> dict[str, str]:
    """The plan to apply, keyed by module paths of `model` (with * for any index).

    The user's plan wins; otherwise the model's own: transformers 5 merges it on the instance
    (`model.tp_plan`: the config's base_model_tp_plan under the base model's prefix, the class's
    `_tp_plan` such as lm_head); an older model gets the same merge here.
    """
    if user_plan:
        return dict(user_plan)
    plan = getattr(model, "tp_plan", None)
    if isinstance(plan, Mapping) and plan:
        return dict(plan)
    config = getattr(model, "config", None)
    base = dict(getattr(config, "base_model_tp_plan", None) or {})
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        base = {f"{prefix}.{k}": v for k, v in base.items()}
    if base:
        base.update(getattr(type(model), "_tp_plan", None) or {})
    return base


def check_tp_model(model: nn.Module, tp_size: int, user_plan: Mapping[str, str] | None) -> dict[str, str]:
    """Refuse, before any work, a model that TP cannot split; return the plan otherwise."""
    name = type(model).__name__
    plan = model_tp_plan(model, user_plan)
    if not plan:
        raise ValueError(
            f"parallelism_config['tp_size']={tp_size}, but {name} carries no tensor-parallel plan "
            "(config.base_model_tp_plan is empty): ember cannot tell which layers to split. Pass one as "
            "parallelism_config['tp_plan'] (e.g. {'model.layers.*.mlp.up_proj': 'colwise', ...}) or use "
            "fsdp / dp_shard_size instead."
        )
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field, None)
        if isinstance(heads, int) and heads % tp_size:
            raise ValueError(
                f"{name} has {field}={heads}, which tp_size={tp_size} does not divide: each TP rank must "
                f"hold whole heads. Choose a tp_size that divides {heads}."
            )
    paths = [n for n, _ in model.named_modules()]
    for pattern, style in plan.items():
        tp_style(style, pattern)  # refuses styles ember cannot apply
        if not any(_path_matches(pattern, p) for p in paths):
            raise ValueError(
                f"The tensor-parallel plan names {pattern!r}, which matches no module of {name}; fix the "
                "plan (module paths from model.named_modules(), * for any index)."
            )
    return plan


def _path_matches(pattern: str, path: str) -> bool:
    atoms, parts = pattern.split("."), path.split(".")
    return len(atoms) == len(parts) and all(fnmatch.fnmatch(p, a) for a, p in zip(atoms, parts, strict=True))


def _tied_head(model: nn.Module) -> bool:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    return weight is not None and weight is getattr(embed, "weight", None)


class MeshStrategy(FSDPStrategy):
    """One process per device on a (dp_replicate, dp_shard, cp, tp) mesh."""

    def __init__(
        self,
        env: LaunchEnv,
        device: torch.device,
        backend: str,
        parallelism: Mapping[str, Any],
        fsdp_config: Mapping[str, Any] | None = None,
        precision: Precision | None = None,
    ) -> None:
        MultiProcess.__init__(self, env, device, backend, precision)
        from torch.distributed.device_mesh import init_device_mesh

        from ..args.distributed import check_parallelism_world_size

        check_parallelism_world_size(parallelism, self.world_size)
        self.config = dict(fsdp_config or {})
        self.parallelism = dict(parallelism)
        self.dp_replicate_size = int(parallelism["dp_replicate_size"])
        self.dp_shard_size = int(parallelism["dp_shard_size"])
        self.tp_size = int(parallelism["tp_size"])
        self.cp_size = int(parallelism.get("cp_size", 1))
        self.user_plan = parallelism.get("tp_plan")
        sizes = (self.dp_replicate_size, self.dp_shard_size, self.cp_size, self.tp_size)
        with collective("building the device mesh", self.rank):
            self.mesh = init_device_mesh(device.type, sizes, mesh_dim_names=MESH_DIMS)
            dp = self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
            if self.cp_size > 1:
                # CP ranks hold shares of the same batch's loss: their gradients are summed like
                # data-parallel ones, so FSDP shards over dp_shard x cp (context.py).
                self.mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        self._dp_mesh = dp
        self._dp_rank = int(dp.get_local_rank())
        self._data_group = dp.get_group() if self.dp_world_size < self.world_size else None
        self._sync = True
        self._plan: dict[str, str] | None = None

    @classmethod
    def build(  # type: ignore[override]
        cls, args: TrainingArguments, env: LaunchEnv, device: torch.device, backend: str, precision: Precision
    ) -> MeshStrategy:
        fsdp_config = args.fsdp_config if isinstance(args.fsdp_config, dict) else {}
        # A dict once the arguments are validated (args/distributed.py).
        parallelism = cast(dict[str, Any], args.parallelism_config)
        strategy = cls(env, device, backend, parallelism, fsdp_config, precision)
        strategy.save_only_model = bool(args.save_only_model)
        return strategy

    # -- ranks --------------------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self._dp_rank

    @property
    def dp_world_size(self) -> int:
        return self.dp_replicate_size * self.dp_shard_size

    @property
    def replicates(self) -> bool:
        """Data parallelism by full copies (DDP-like): gradients all-reduced here, after backward."""
        return self.dp_shard_size == 1 and self.cp_size == 1 and self.dp_replicate_size > 1

    def _shard_mesh(self) -> Any:
        shard = "dp_shard_cp" if self.cp_size > 1 else "dp_shard"
        if self.dp_replicate_size > 1:
            return self.mesh["dp_replicate", shard]  # HSDP: shard within, replicate across
        return self.mesh[shard]

    # -- model --------------------------------------------------------------------------------------
    def place_model(self, model: nn.Module) -> nn.Module:
        """Check the model against the layout (before any work) and move it to the device; it is
        split in `setup_model`, after the model pipeline (adapters, checkpointing, compile)."""
        if self.tp_size > 1 and not is_tp_distributed(model):
            self._plan = check_tp_model(model, self.tp_size, self.user_plan)
        if self.cp_size > 1:
            check_cp_model(model, self.cp_size, shifts_labels(model))
        if is_tp_distributed(model):
            self._check_distributed(model)
            return model
        return super(FSDPStrategy, self).place_model(model)

    def _check_distributed(self, model: nn.Module) -> None:
        from torch.distributed.tensor import DTensor

        sizes = {p.device_mesh.size() for p in model.parameters() if isinstance(p, DTensor)}
        if sizes != {self.tp_size}:
            raise ValueError(
                f"The model is already tensor-parallel over {sorted(sizes)} ranks (loaded with tp_plan=...), "
                f"but parallelism_config['tp_size'] is {self.tp_size}; set tp_size to {sorted(sizes)[0]}."
            )

    def setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):  # a second train()
            return model
        model = self.place_model(model)
        if self.cp_size > 1:
            use_cp_attention(model)
        if self.tp_size > 1 and not is_tp_distributed(model):
            self._parallelize(model)
        if self.dp_shard_size * self.cp_size > 1:
            return super().setup_model(model)
        if self.replicates:
            self._broadcast_from_first_replica(model)
        return model

    def _parallelize(self, model: nn.Module) -> None:
        from torch.distributed.tensor.parallel import parallelize_module

        plan = dict(self._plan or check_tp_model(model, self.tp_size, self.user_plan))
        if _tied_head(model):
            # The head shares the embedding's weight; splitting it alone would untie them. Kept whole.
            head = [k for k in plan if _path_matches(k, "lm_head")]
            for key in head:
                logger.info("ember: %s stays replicated under TP: its weight is tied to the embeddings", key)
                del plan[key]
            for key in [k for k, v in plan.items() if v.startswith("embedding")]:
                del plan[key]
        styles = {k: s for k, v in plan.items() if (s := tp_style(v, k)) is not None}
        with collective("splitting the model (tensor parallelism)", self.rank):
            parallelize_module(model, self.mesh["tp"], styles)
        logger.info("ember: tensor parallel over %d ranks, %d plan entries", self.tp_size, len(styles))

    def _broadcast_from_first_replica(self, model: nn.Module) -> None:
        """Every replica starts from data-parallel rank 0's values, as DDP does at construction."""
        src = dist.get_global_rank(self._dp_mesh.get_group(), 0)
        with collective("broadcasting the model to the replicas", self.rank), torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(_local(tensor), src=src, group=self._dp_mesh.get_group())

    def setup_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        from torch.distributed.tensor import DTensor

        model, optimizer = super().setup_optimizer(model, optimizer)
        if optimizer is None:
            return model, optimizer
        for group in optimizer.param_groups:
            kinds = {isinstance(p, DTensor) for p in group["params"]}
            if len(kinds) > 1:
                # One group holds TP shards and whole tensors (e.g. Qwen2's split q/k/v biases with the
                # unsplit norms, both without weight decay): foreach/fused steps refuse the mix unless
                # the whole tensors count as replicated, which they are on every TP rank.
                _step_with_implicit_replication(optimizer)
                break
        return model, optimizer

    # -- training -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        self._sync = sync
        with super().no_sync(model, sync):
            yield

    def carry_reduced_gradients(self, model: nn.Module) -> None:
        """As DDP: the replicas' sum after backward covers the whole `.grad`, so what is already summed
        is divided by the number of replicas first."""
        if not self.replicates:
            return
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    _local(p.grad).div_(self.dp_replicate_size)

    def split_sequences(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.cp_size == 1:
            return inputs
        cp = self.mesh["cp"]
        return shard_batch(inputs, cp.get_group(), int(cp.get_local_rank()), self.cp_size)

    def sum_sequence_parts(self, loss: torch.Tensor) -> torch.Tensor:
        if self.cp_size == 1:
            return loss
        total = loss.detach().clone()
        with collective("summing the loss over the sequence parts", self.rank):
            dist.all_reduce(total, group=self.mesh["cp"].get_group())
        return total

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        try:
            super().backward(loss, model)
        finally:
            if self.cp_size > 1:
                clear_shard()  # evaluation and generation see whole sequences
        if self.replicates and self._sync:
            grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
            with collective("summing gradients over the replicas", self.rank):
                for grad in grads:
                    dist.all_reduce(grad, group=self._dp_mesh.get_group())

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global L2 norm over every shard of every gradient, each element counted once,
        then one scale applied to every local shard."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        with collective("clipping gradients", self.rank):
            total = global_grad_norm(grads, self.device)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            _local(grad).mul_(coef.to(_local(grad).dtype))
        return total


def _step_with_implicit_replication(optimizer: torch.optim.Optimizer) -> None:
    import functools

    from torch.distributed.tensor.experimental import implicit_replication

    step = optimizer.step

    @functools.wraps(step)
    def replicated_step(*args: Any, **kwargs: Any) -> Any:
        with implicit_replication():
            return step(*args, **kwargs)

    optimizer.step = replicated_step  # type: ignore[method-assign]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def global_grad_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of the whole gradient, whatever mix of plain tensors and DTensors on several meshes.

    Per (mesh, placements): the sum of squares of the local shards, summed over the mesh dims the
    tensor is split on (Shard, or Partial) and not over those it is replicated on, so no element
    counts twice. One all-reduce per distinct layout.
    """
    from torch.distributed.tensor import DTensor, Replicate

    squares = torch.zeros((), dtype=torch.float32, device=device)
    groups: dict[tuple[Any, ...], list[DTensor]] = {}
    for grad in grads:
        if isinstance(grad, DTensor):
            key = (id(grad.device_mesh), tuple(grad.placements))
            groups.setdefault(key, []).append(grad)
        else:
            squares = squares + grad.detach().float().pow(2).sum()
    for members in groups.values():
        first = members[0]
        part = torch.stack([g.to_local().detach().float().pow(2).sum() for g in members]).sum()
        for dim, placement in enumerate(first.placements):
            if not isinstance(placement, Replicate) and first.device_mesh.size(dim) > 1:
                dist.all_reduce(part, group=first.device_mesh.get_group(dim))
        squares = squares + part.to(device)
    return squares.sqrt()
