"""Context parallelism (`parallelism_config['cp_size']`): each sequence of a training batch is split
over the ranks of the `cp` mesh dimension, so activation memory per rank falls with cp_size.

How: the ranks of one CP group receive the same batch (the sampler shards over data-parallel ranks
only). Before the forward, `shard_batch` keeps this rank's part of every sequence, load-balanced
for causal attention (the sequence is cut into 2 x cp chunks; rank r keeps chunks r and 2cp-1-r,
so every rank has as many early, cheap queries as late, expensive ones). Labels are shifted once,
whole, before the split (`shift_labels`): a shift inside each part would lose the target across
each cut. Positions are the global ones.

Attention is the one place where positions meet: ember registers an attention function with
transformers' `AttentionInterface` ("ember_cp"). Each rank gathers the keys and values of the whole
sequence from its CP group (autograd-aware: the backward sums each part's gradient back to its
owner) and attends with its own queries under the global causal mask: each of its two chunks sees
the prefix that ends with it, through torch's lower-right causal bias (no mask is built, and the
flash / memory-efficient kernels run on GPUs); padding, packed documents or a sliding window need
a mask, built once per micro-batch and shared by every layer. This is the all-gather form of
context parallelism (the one Llama 3 was trained with): communication is the K/V of one layer at a
time, which GQA keeps small; it runs with any backend, gloo included, so it is tested here on CPU
against one process.

Outside a sharded training micro-batch (evaluation, generation) the function is transformers' SDPA
on the whole sequence: evaluation stores no activations for backward, so it fits unsplit where
training did not.

Gradients: every CP rank holds a share of the loss of the same batch, so parameter gradients are
summed over CP ranks as over data-parallel ones: FSDP2 shards over the flattened (dp_shard, cp)
dimensions (mesh.py). The step's logged loss is the sum of the shares over the CP group.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..engine.loss import IGNORE_INDEX

ATTENTION_NAME = "ember_cp"


@dataclass
class SequenceShard:
    """Where this rank's part of the current micro-batch lies in the whole sequence."""

    group: Any
    rank: int
    size: int
    #: Sequence indices (in the whole, padded sequence) of this rank's positions, in local order.
    index: torch.Tensor
    #: The order that turns the gathered parts (rank 0's, rank 1's, ...) into sequence order.
    order: torch.Tensor
    length: int
    #: Whole-batch masks: keys that are padding ([batch, length] bool, True = real), and document
    #: ids of packed sequences ([batch, length]); None when the batch has none.
    key_mask: torch.Tensor | None
    documents: torch.Tensor | None
    #: Masks built for this micro-batch, one per sliding window: every layer shares one tensor.
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)


_local = threading.local()


def active_shard() -> SequenceShard | None:
    return getattr(_local, "shard", None)


def clear_shard() -> None:
    _local.shard = None


def load_balanced_index(length: int, size: int, rank: int, device: torch.device) -> torch.Tensor:
    """Sequence positions of `rank`: chunks rank and 2*size-1-rank of 2*size equal chunks."""
    chunk = length // (2 * size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    mirror = 2 * size - 1 - rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


def _pad_to(tensor: torch.Tensor, length: int, value: float | int) -> torch.Tensor:
    extra = length - tensor.shape[1]
    if extra == 0:
        return tensor
    pad = tensor.new_full((tensor.shape[0], extra, *tensor.shape[2:]), value)
    return torch.cat([tensor, pad], dim=1)


def _checked(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and causal-LM `labels` of a micro-batch, both [batch, sequence]."""
    ids = inputs.get("input_ids")
    labels = inputs.get("labels")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(
            "context parallelism (parallelism_config['cp_size'] > 1) splits `input_ids` of shape "
            f"[batch, sequence]; this batch has {'no input_ids' if ids is None else tuple(ids.shape)}."
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
        raise ValueError(
            "context parallelism needs causal-LM `labels` shaped like `input_ids` in every training batch "
            "(the targets are shifted before the sequence is split); this batch has "
            f"{'none' if labels is None else tuple(labels.shape)}."
        )
    return ids, labels


def shard_batch(inputs: dict[str, Any], group: Any, rank: int, size: int) -> dict[str, Any]:
    """This rank's part of a causal-LM micro-batch (on the device), and the shard it sets active.

    The sequence is padded at its end to a multiple of 2 x size: padding after every real token is
    invisible to them under the causal mask, and its targets are ignored.
    """
    ids, labels = _checked(inputs)
    batch, real = ids.shape
    unit = 2 * size
    length = -(-real // unit) * unit
    device = ids.device
    positions = inputs.get("position_ids")
    if positions is None:
        positions = torch.arange(real, device=device)
    positions = positions.expand(batch, real)
    attention = inputs.get("attention_mask")
    shifted = torch.cat([labels[:, 1:], labels.new_full((batch, 1), IGNORE_INDEX)], dim=1)

    key_mask = None
    if isinstance(attention, torch.Tensor) and not bool(attention.all()):
        key_mask = _pad_to(attention.bool(), length, False)
    documents = None
    if "position_ids" in inputs and attention is None:
        # Packed sequences, read as transformers reads them: a new document starts wherever the
        # positions do not go up by one.
        starts = torch.diff(positions, prepend=positions[:, :1] - 1, dim=1) != 1
        if bool(starts[:, 1:].any()):
            documents = _pad_to(torch.cumsum(starts.long(), dim=1), length, -1)
    tail = positions[:, -1:] + torch.arange(1, length - real + 1, device=device)
    positions = torch.cat([positions, tail], dim=1) if length > real else positions

    index = load_balanced_index(length, size, rank, device)
    parts = torch.cat([load_balanced_index(length, size, r, device) for r in range(size)])
    order = torch.argsort(parts)
    out = dict(inputs)
    out.pop("attention_mask", None)
    # A KV cache of this rank's part would be wrong, and training has no use for one; without it
    # transformers' own one-process masks honour packed position_ids as this one does.
    out["use_cache"] = False
    out["input_ids"] = _pad_to(ids, length, 0).index_select(1, index)
    out["labels"] = _pad_to(labels, length, IGNORE_INDEX).index_select(1, index)
    out["shift_labels"] = _pad_to(shifted, length, IGNORE_INDEX).index_select(1, index)
    out["position_ids"] = positions.index_select(1, index)
    for key, value in inputs.items():
        if key in ("input_ids", "labels", "position_ids", "attention_mask", "shift_labels"):
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (batch, real):
            out[key] = _pad_to(value, length, 0).index_select(1, index)
    _local.shard = SequenceShard(group, rank, size, index, order, length, key_mask, documents)
    return out


class _GatherSequence(torch.autograd.Function):
    """All-gather of [batch, heads, part, dim] over the CP group along dim 2, in rank order. The
    backward sums every rank's gradient of the whole and hands each rank the gradient of its part."""

    @staticmethod
    def forward(ctx: Any, part: torch.Tensor, group: Any, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.size = group, rank, size
        part = part.contiguous()
        parts = [torch.empty_like(part) for _ in range(size)]
        dist.all_gather(parts, part, group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        chunks = [c.contiguous() for c in grad.chunk(ctx.size, dim=2)]
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty_like(chunks[ctx.rank])
            dist.reduce_scatter(out, chunks, group=ctx.group)
            return out, None, None, None
        # gloo has no reduce-scatter: sum the whole, keep this rank's part.
        whole = grad.contiguous()
        dist.all_reduce(whole, group=ctx.group)
        return whole.chunk(ctx.size, dim=2)[ctx.rank].contiguous(), None, None, None


def gather_sequence(part: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The whole sequence of `part` ([batch, heads, local, dim]) in sequence order."""
    whole = _GatherSequence.apply(part, shard.group, shard.rank, shard.size)
    return whole.index_select(2, shard.order)


def _mask(shard: SequenceShard, device: torch.device, window: int | None) -> torch.Tensor:
    """[batch or 1, 1, local, length] bool: which keys each local query sees."""
    q = shard.index.to(device)[:, None]
    k = torch.arange(shard.length, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    mask = allowed[None, None]
    if shard.documents is not None:
        docs = shard.documents.to(device)
        same = docs.index_select(1, shard.index.to(device))[:, :, None] == docs[:, None, :]
        mask = mask & same[:, None]
    if shard.key_mask is not None:
        mask = mask & shard.key_mask.to(device)[:, None, None, :]
    # A query that sees no key (a padding query before any real token) would give NaN; let it see
    # itself. Its output feeds no target.
    return mask | (k == q)[None, None]


def context_parallel_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query/key/value [batch, heads, local, dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shard = active_shard()
    if shard is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[2] != shard.index.numel():
        raise RuntimeError(
            f"context parallelism: {type(module).__name__} attends over {query.shape[2]} positions, but this "
            f"rank holds {shard.index.numel()} of the sequence; the model changes the sequence length inside "
            "its layers, which ember's context parallelism does not support. Set cp_size to 1."
        )
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(
                f"context parallelism: {type(module).__name__} uses attention {name}, which ember's context "
                "parallelism does not apply. Set cp_size to 1."
            )
    key = gather_sequence(key, shard)
    value = gather_sequence(value, shard)
    gqa = query.shape[1] != key.shape[1]
    window = kwargs.get("sliding_window")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if shard.key_mask is None and shard.documents is None and window is None:
        # Plain causal: each local chunk attends to the prefix that ends with it. torch's lower-right
        # causal bias runs the flash / memory-efficient kernels without building a mask, and skips
        # the keys after the chunk instead of masking them.
        from torch.nn.attention.bias import causal_lower_right

        chunk = shard.length // (2 * shard.size)
        outs = []
        for part, index in zip(query.split(chunk, dim=2), (shard.rank, 2 * shard.size - 1 - shard.rank)):
            end = (index + 1) * chunk
            bias = causal_lower_right(chunk, end)
            k, v = key[:, :, :end], value[:, :, :end]
            outs.append(sdpa(part, k, v, attn_mask=bias, dropout_p=dropout, scale=scaling, enable_gqa=gqa))
        out = torch.cat(outs, dim=2)
    else:
        mask = shard.masks.get(window)
        if mask is None:
            mask = shard.masks[window] = _mask(shard, query.device, window)
        out = sdpa(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make "ember_cp" a name transformers' models accept for `config._attn_implementation`; its
    masks (used outside sharded micro-batches) are SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def check_cp_model(model: nn.Module, cp_size: int, label_shift: bool) -> None:
    """Refuse, before any work, a model that context parallelism cannot split."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if not label_shift:
        raise ValueError(
            f"parallelism_config['cp_size']={cp_size}: ember's context parallelism splits causal language "
            f"models (the targets are shifted before the split), and {name} is not one. Set cp_size to 1."
        )
    if config is None or not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"parallelism_config['cp_size']={cp_size}: {name} does not run its attention through "
            "transformers' AttentionInterface, where ember puts the attention that sees the whole sequence. "
            "Set cp_size to 1, or use a model whose class supports attention backends."
        )
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        raise ValueError(
            f"parallelism_config['cp_size']={cp_size}: {name} is not a decoder-only causal model. "
            "Set cp_size to 1."
        )


def use_cp_attention(model: nn.Module) -> None:
    """Point every config of the model at "ember_cp" (sub-configs of multimodal models included)."""
    register_attention()
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(ATTENTION_NAME)
        return
    model.config._attn_implementation = ATTENTION_NAME  # type: ignore[union-attr]
