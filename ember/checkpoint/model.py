"""The one model save/load pair: every checkpoint, `save_model`, resume and the best-model reload go
through `save_model_files` / `load_model_files`. Never pickle.

Folder kinds it writes and reads back:
- a transformers model: `save_pretrained` (config.json + model.safetensors, or shards
  `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` past `max_shard_size`);
- a PEFT model: the adapters only, `adapter_model.safetensors` + `adapter_config.json` (other
  adapters than "default" in a subfolder named after them), as `PeftModel.save_pretrained` writes;
- a plain `nn.Module`: `model.safetensors`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import CheckpointError, read_json, resolve_inside, save_safetensors

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: Shard size of `save_pretrained` in checkpoints and save_model; a file over it is split with an index.
MAX_SHARD_SIZE: int | str = "5GB"


def is_peft_model(model: Any) -> bool:
    """A PEFT wrapper (PeftModel and its task subclasses), recognised without importing peft."""
    return isinstance(getattr(model, "peft_config", None), dict) and callable(
        getattr(model, "get_base_model", None)
    )


def save_model_files(
    model: nn.Module,
    folder: str | Path,
    processing_class: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str | None = None,
) -> None:
    """Write the model (and its tokenizer/processor) into `folder`, which is created if needed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_pretrained = getattr(model, "save_pretrained", None)
    if is_peft_model(model):
        # PEFT picks its adapter tensors out of the full state dict; every adapter is written.
        peft_model: Any = model
        peft_model.save_pretrained(
            str(folder), state_dict=state_dict, selected_adapters=list(peft_model.peft_config)
        )
    elif callable(save_pretrained):
        with _no_shard_progress_bar(), _consolidated(model, state_dict):
            save_pretrained(
                str(folder), state_dict=state_dict, max_shard_size=max_shard_size or MAX_SHARD_SIZE
            )
    else:
        save_plain_module(model, folder, state_dict)
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(str(folder))


@contextlib.contextmanager
def _consolidated(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """A model that transformers distributed itself (`from_pretrained(tp_plan="auto")`) carries a
    `config.distributed_config`, and its save_pretrained then gathers shards and waits at a barrier
    of every rank; ember calls it on the main process only, with the state it already gathered.
    Hidden while saving, so the folder is one plain checkpoint (and no rank waits for the others)."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "distributed_config", None)
    if state_dict is None or hidden is None:
        yield
        return
    config.distributed_config = None  # type: ignore[union-attr]
    try:
        yield
    finally:
        config.distributed_config = hidden  # type: ignore[union-attr]


@contextlib.contextmanager
def _no_shard_progress_bar() -> Iterator[None]:
    """transformers 5 draws a "Writing model shards" bar on every save_pretrained, even for one local
    file written in milliseconds; ember reports its own saves, so the bar is off while it saves."""
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is None or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_model_files(
    model: nn.Module,
    folder: str | Path,
    apply: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> None:
    """Load what `save_model_files` wrote in `folder` into `model` (the unwrapped module).

    `apply` puts a full, model-keyed state dict into the model (a sharded model needs its own);
    by default `load_state_dict` with a check that every weight was found.
    """
    folder = Path(folder)
    if is_peft_model(model):
        if apply is not None:
            raise NotImplementedError(
                "Loading PEFT adapters into a sharded (FSDP) model is not supported yet; train PEFT "
                "models without fsdp, or load the adapter with PeftModel.from_pretrained after training."
            )
        _load_adapters(model, folder)
        return
    tensors = read_model_tensors(folder)
    if apply is not None:
        apply(tensors)
    else:
        _load_full(model, tensors, folder)


def read_model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a full-model folder: one `model.safetensors`, or the shards its index names."""
    from safetensors.torch import load_file

    index = folder / WEIGHTS_INDEX_NAME
    if index.exists():
        doc = read_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map; the file is damaged.")
        # Shard names come from the file: each must resolve inside the folder.
        shards = {resolve_inside(folder, v, index, f"weight_map[{k!r}]") for k, v in weight_map.items()}
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(shards):
            tensors.update(load_file(str(shard)))
        return tensors
    if (folder / WEIGHTS_NAME).exists():
        return load_file(str(folder / WEIGHTS_NAME))
    if (folder / ADAPTER_WEIGHTS_NAME).exists():
        raise ValueError(
            f"{folder} holds a PEFT adapter ({ADAPTER_WEIGHTS_NAME}) but the model is not a PEFT model; "
            "wrap it the same way as when the checkpoint was written (peft.get_peft_model) first."
        )
    raise FileNotFoundError(
        f"{folder} holds neither {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} nor {ADAPTER_WEIGHTS_NAME}; "
        "it is not a checkpoint of a model."
    )


def _load_full(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    result = model.load_state_dict(tensors, strict=False)
    own = model.state_dict()
    loaded = {_storage(own[k]) for k in tensors if k in own}
    # Tied weights (e.g. lm_head = wte) are written once; their twins share storage and are filled.
    missing = [k for k in result.missing_keys if _storage(own[k]) not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The weights in {folder} do not fit the model: missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}. Was the checkpoint written for another architecture?"
        )


def _load_adapters(model: Any, folder: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    for name in model.peft_config:
        path = (folder if name == "default" else folder / name) / ADAPTER_WEIGHTS_NAME
        if not path.exists():
            hint = " (PEFT writes adapters other than 'default' in a subfolder of that name)"
            raise FileNotFoundError(f"{path} is missing: adapter {name!r} has no weights there{hint}.")
        saved = load_file(str(path))
        expected = set(get_peft_model_state_dict(model, adapter_name=name))
        if set(saved) != expected:
            raise ValueError(
                f"The adapter {name!r} in {path.parent} does not fit the model: missing "
                f"{sorted(expected - set(saved))[:5]}, unexpected {sorted(set(saved) - expected)[:5]}. "
                "Was it written with another LoraConfig (rank, target_modules)?"
            )
        set_peft_model_state_dict(model, saved, adapter_name=name)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    return (t.untyped_storage().data_ptr(), int(t.storage_offset()))


def save_plain_module(
    model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    tensors = _dedupe_shared(state_dict if state_dict is not None else model.state_dict())
    save_safetensors(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape))


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage; keep the first name of each storage."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out
