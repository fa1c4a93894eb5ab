"""One rank of tests/bench/test_memory_plan.py: builds the tiny models, lays them out with PyTorch's
own TP and FSDP2 (gloo, CPU), takes one AdamW step and writes this rank's local bytes of parameters,
gradients and optimizer state to OUT/rank-N.json.

    python -m tests.bench.memory_plan_worker OUT LAYOUT[,LAYOUT...]   # under RANK/WORLD_SIZE/MASTER_*

Layouts: tp (2 ranks), fsdp and fsdp-bf16 (2 ranks, the latter with MixedPrecisionPolicy bf16/fp32),
dp-tp (4 ranks: FSDP over dp_shard of a 2-D mesh on top of TP) and hsdp (4 ranks: 2 x 2).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCHS = ("llama", "qwen2")
SEQ, BATCH = 16, 2


def tiny(arch: str) -> nn.Module:
    """hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 101 (odd: FSDP splits it unevenly)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch,
        vocab_size=101,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def train_step(model: nn.Module) -> torch.optim.Optimizer:
    ids = torch.randint(0, 101, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt


def measure(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds: sum of local shards' numel x element_size (the 0-d step counters are
    left out: AdamW keeps them on the host)."""

    def nbytes(tensors: Any) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors)

    params = list(model.parameters())
    return {
        "parameters": nbytes(params),
        "gradients": nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": nbytes(
            v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()
        ),
    }


def parallelize(model: nn.Module, mesh: Any) -> None:
    """transformers' TP plan, as bench.memory_plan states it, through torch's parallelize_module."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from bench.memory_plan import HEAD_TP_PLAN, TP_PLAN

    styles: dict[str, Callable[[], Any]] = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    }
    plan = {f"model.{k}": styles[v]() for k, v in TP_PLAN.items()}
    plan.update({k: styles[v]() for k, v in HEAD_TP_PLAN.items()})
    parallelize_module(model, mesh, plan)


def shard(model: nn.Module, mesh: Any, bf16: bool = False) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, "mp_policy": mp} if mp else {"mesh": mesh}
    for layer in model.get_submodule("model.layers").children():
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def lay_out(model: nn.Module, layout: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    if layout == "tp":
        parallelize(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
    elif layout in ("fsdp", "fsdp-bf16"):
        shard(model, init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",)), bf16=layout == "fsdp-bf16")
    elif layout == "dp-tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
        parallelize(model, mesh["tp"])
        shard(model, mesh["dp_shard"])
    elif layout == "hsdp":
        shard(model, init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard")))
    else:
        raise ValueError(f"unknown layout {layout!r}")


def main(out: str, layouts: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result: dict[str, dict[str, dict[str, int]]] = {}
    for layout in layouts.split(","):
        for arch in ARCHS:
            model = tiny(arch)
            lay_out(model, layout)
            result.setdefault(layout, {})[arch] = measure(model, train_step(model))
    Path(out, f"rank-{os.environ['RANK']}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
