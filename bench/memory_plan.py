"""Capacity on paper: per-rank bytes of parameters, gradients, AdamW state and activations of a
Llama-style causal LM under a `parallelism_config` layout, and whether they fit one device.

    python -m bench.memory_plan --model llama-3-8b --dp-shard 8 --seq 4096 --dtype bf16 --checkpointing
    python -m bench.memory_plan --model path/to/config.json --dp-shard 4 --tp 2 --seq 8192 --micro-batch 1
    python -m bench.memory_plan --table --out bench/results/memory-plan.md   # 8B/70B on 8 x 80 GiB

`--model` is a name from `MODELS` (plain numbers: nothing is downloaded), a path to a config.json,
or, from Python, a transformers config object or dict (`plan(config, Layout(dp_shard=8), ...)`).
Model types: llama, mistral, qwen2 (the Llama block: RMSNorm, GQA attention, SwiGLU MLP).

Layout (accelerate's ParallelismConfig names): FSDP2 shards every parameter, its gradient and its
AdamW state over dp_shard x cp (dim 0, the largest rank counted); dp_replicate holds full copies
of that shard (HSDP, or DDP when dp_shard is 1); tp splits the linear layers as transformers'
`base_model_tp_plan` and the causal-LM `_tp_plan` say (`TP_PLAN`: q/k/v/gate/up and lm_head
colwise, o/down rowwise with their bias replicated) while the embedding and the norms stay
replicated; cp splits the sequence as ember's context parallelism does (strategy/context.py): each
rank keeps its activations of seq / cp tokens, plus, per layer, the keys and values of the whole
sequence that its attention gathered (kept for backward: 2 x kv x seq x micro_batch x a / tp).
The cp terms follow the code; unlike the others, they were not measured.

Precision (`--dtype`): fp32, or bf16 as ember's `bf16=True` runs it: with FSDP (dp_shard x cp > 1)
FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 sharded master weights, fp32 gradient reduce);
without FSDP torch.autocast (fp32 weights, matmuls in bf16).

Bytes per rank (P = this rank's parameter elements after TP and FSDP):
- parameters 4P, gradients 4P, optimizer 8P (fp32 exp_avg and exp_avg_sq; the step counter lives
  on the host): the same in bf16, whose master weights and gradients stay fp32.
- working copies: without FSDP in bf16, autocast's bf16 copy of every matmul weight (linear
  layers and head), alive from the forward to the backward (measured: exact); with FSDP
  (estimated, not measured), the unsharded compute-dtype parameters of the root group
  (embedding, final norm, head: not resharded between forward and backward) and of two decoder
  blocks (current + prefetched) plus one block's unsharded gradients; none without FSDP in fp32.
- activations saved for backward. a = bytes of the compute dtype (4 fp32, 2 bf16); T = micro_batch
  x seq / cp tokens; h hidden, q = heads x head_dim, kv = kv_heads x head_dim, I intermediate,
  V vocab, L layers. Per decoder layer, T x
      [ N                            the two RMSNorms (below)
        + a x (2q + 2kv) / tp        SDPA's fused kernel: rotated q and k, v, its output
        + 4 x heads / tp + 8         SDPA's fp32 logsumexp; the norms' fp32 rsqrt
        + 4a x I / tp ]              SwiGLU: gate, up, silu(gate), silu(gate) x up
  N = 2 x (4 + 2a) x h in fp32 and bf16 compute (each norm keeps its fp32 input, the normalised
  x and the output the linears share); under autocast the residual stream is fp32, so
  N = 2 x 8h + 5 x 2h (fp32 input and normalised x, and one bf16 cast of the output for each of
  q, k, v, gate and up). Plus the final norm, T x ((4 + 2a) h + 4) (T x (10h + 4) under autocast:
  one cast, for the head), and the head T x V x (a + 4): the logits (gathered to every TP rank by
  `colwise_gather_output`) and the loss's fp32 log-softmax.
  Activation checkpointing keeps one input per layer, L x T x h x a (fp32 under autocast), and
  during backward one layer's full set again (its recomputation).
  Approximation: within ~1% of the tensors eager transformers Llama/Qwen2 save (SDPA's fused
  kernel, no dropout, no padding mask), as tests/bench/test_memory_plan.py measures. Not counted:
  RoPE tables and token ids (< 1%), the logits' gradient and other transient buffers of backward,
  DDP's gradient buckets, the CUDA context, NCCL buffers, allocator fragmentation. A padding mask
  makes SDPA fall back to a kernel that stores T x seq x heads scores; ember's chunked loss
  replaces the head term by about T x h x a + 4 x V x h / tp (from its code, not measured).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30

_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads")  # fmt: skip


def _config(
    kind: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, **extra: Any
) -> dict:
    """The config.json fields the plan reads."""
    sizes = (vocab, hidden, inter, layers, heads, kv)
    return {"model_type": kind, **dict(zip(_FIELDS, sizes)), **extra}


# Well-known shapes, as in their config.json files on the Hugging Face Hub (nothing is downloaded).
MODELS: dict[str, dict[str, Any]] = {
    # model_type, vocab_size, hidden_size, intermediate_size, num_hidden_layers, heads, kv heads
    "llama-3-8b": _config("llama", 128256, 4096, 14336, 32, 32, 8, tie_word_embeddings=False),
    "llama-3-70b": _config("llama", 128256, 8192, 28672, 80, 64, 8, tie_word_embeddings=False),
    "llama-3.2-1b": _config("llama", 128256, 2048, 8192, 16, 32, 8, head_dim=64, tie_word_embeddings=True),
    "mistral-7b": _config("mistral", 32000, 4096, 14336, 32, 32, 8, tie_word_embeddings=False),
    "qwen2-7b": _config("qwen2", 152064, 3584, 18944, 28, 28, 4, tie_word_embeddings=False),
}

# transformers' LlamaConfig/MistralConfig/Qwen2Config.base_model_tp_plan and *ForCausalLM._tp_plan
# (the test checks them against the installed transformers). Unlisted modules are replicated.
TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
HEAD_TP_PLAN = {"lm_head": "colwise_gather_output"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    cp: int = 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.cp

    def __str__(self) -> str:
        return f"dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x tp {self.tp} x cp {self.cp}"


def shape_of(config: Any) -> Shape:
    """A Shape from a name in MODELS, a path to a config.json, a dict or a transformers config."""
    if isinstance(config, (str, Path)):
        if str(config).lower() in MODELS:
            config = MODELS[str(config).lower()]
        elif Path(config).is_file():
            config = json.loads(Path(config).read_text())
        else:
            raise ValueError(
                f"--model {config!r}: neither a known name ({', '.join(MODELS)}) nor a config.json"
            )

    def get(key: str, default: Any = None) -> Any:
        value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
        return default if value is None else value

    kind = get("model_type")
    if kind not in ("llama", "mistral", "qwen2"):
        raise ValueError(
            f"model_type {kind!r}: the formulas model the Llama block (llama, mistral, qwen2); "
            "pass a config of one of those"
        )
    missing = [k for k in _FIELDS[:5] if get(k) is None]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}: give a complete config.json")
    heads = int(get("num_attention_heads"))
    bias = bool(get("attention_bias", False))
    return Shape(
        vocab=int(get("vocab_size")),
        hidden=int(get("hidden_size")),
        intermediate=int(get("intermediate_size")),
        layers=int(get("num_hidden_layers")),
        heads=heads,
        kv_heads=int(get("num_key_value_heads", heads)),
        head_dim=int(get("head_dim", int(get("hidden_size")) // heads)),
        tied=bool(get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2" or bias,  # Qwen2 always has q/k/v biases, never an o_proj bias
        o_bias=kind != "qwen2" and bias,
        mlp_bias=bool(get("mlp_bias", False)),
    )


def parameters(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, dims, TP style of this tensor) of every parameter tensor, block 0 standing for all."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    linears = {  # module -> (out, in, has bias)
        "self_attn.q_proj": (q, h, shape.qkv_bias),
        "self_attn.k_proj": (kv, h, shape.qkv_bias),
        "self_attn.v_proj": (kv, h, shape.qkv_bias),
        "self_attn.o_proj": (h, q, shape.o_bias),
        "mlp.gate_proj": (i, h, shape.mlp_bias),
        "mlp.up_proj": (i, h, shape.mlp_bias),
        "mlp.down_proj": (h, i, shape.mlp_bias),
    }
    out: list[tuple[str, tuple[int, ...], str]]
    out = [("model.layers.0.input_layernorm.weight", (h,), "replicate"),
           ("model.layers.0.post_attention_layernorm.weight", (h,), "replicate")]  # fmt: skip
    for module, (n_out, n_in, bias) in linears.items():
        style = TP_PLAN.get(f"layers.*.{module}", "replicate")
        out.append((f"model.layers.0.{module}.weight", (n_out, n_in), style))
        if bias:  # a colwise bias is split with the outputs; a rowwise one is added after the reduce
            out.append(
                (f"model.layers.0.{module}.bias", (n_out,), "colwise" if style == "colwise" else "replicate")
            )
    head = "colwise" if HEAD_TP_PLAN["lm_head"].startswith("colwise") else "replicate"
    # A tied head shares the embedding's tensor: counted once, split as the head is.
    out.append(("model.embed_tokens.weight", (shape.vocab, h), head if shape.tied else "replicate"))
    out.append(("model.norm.weight", (h,), "replicate"))
    if not shape.tied:
        out.append(("lm_head.weight", (shape.vocab, h), head))
    return out


def local_numel(dims: tuple[int, ...], style: str, tp: int, shard: int) -> int:
    """Elements on the largest rank: TP splits rows (colwise) or columns (rowwise), then FSDP dim 0."""
    d = list(dims)
    if style == "colwise":
        d[0] = math.ceil(d[0] / tp)
    elif style == "rowwise":
        d[1] = math.ceil(d[1] / tp)
    d[0] = math.ceil(d[0] / shard)
    return math.prod(d)


def check(shape: Shape, layout: Layout, seq: int, micro_batch: int, dtype: str) -> None:
    for name in ("dp_replicate", "dp_shard", "tp", "cp"):
        if getattr(layout, name) < 1:
            raise ValueError(f"{name} must be >= 1")
    if shape.heads % layout.tp or shape.kv_heads % layout.tp:
        raise ValueError(
            f"tp {layout.tp} must divide num_attention_heads {shape.heads} and num_key_value_heads "
            f"{shape.kv_heads}: pick a tp that divides both"
        )
    if seq < 1 or micro_batch < 1 or seq % layout.cp:
        raise ValueError(f"seq {seq} must be >= 1 and divisible by cp {layout.cp}; micro_batch >= 1")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")


def activations(
    shape: Shape, layout: Layout, seq: int, micro_batch: int, dtype: str, checkpointing: bool, autocast: bool
) -> dict[str, int]:
    """Bytes saved for backward (module docstring): `saved` after forward, `recompute` in backward."""
    a, tp, h = DTYPE_BYTES[dtype], layout.tp, shape.hidden
    tokens = micro_batch * seq // layout.cp
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * 8 * h + 5 * a * h if autocast else 2 * (4 + 2 * a) * h
    attention = (a * (2 * q + 2 * kv) + 4 * shape.heads) // tp
    layer = tokens * (norms + 8 + attention + 4 * a * math.ceil(shape.intermediate / tp))
    if layout.cp > 1:  # the gathered whole-sequence K and V replace the local ones
        layer += tokens * (layout.cp - 1) * 2 * a * kv // tp
    final_norm = 8 * h + a * h if autocast else (4 + 2 * a) * h
    final = tokens * (final_norm + 4) + tokens * shape.vocab * (a + 4)
    if checkpointing:
        residual = 4 if autocast else a
        return {"saved": shape.layers * tokens * h * residual + final, "recompute": layer}
    return {"saved": shape.layers * layer + final, "recompute": 0}


def _copies(shape: Shape, name: str) -> int:
    """How many tensors a name from `parameters` stands for: one per layer for block 0."""
    return shape.layers if ".layers.0." in name else 1


def working_copies(shape: Shape, layout: Layout, dtype: str) -> int:
    """Bytes of the compute-dtype copies of the weights (module docstring)."""
    a, tensors = DTYPE_BYTES[dtype], parameters(shape)
    if layout.dp_shard * layout.cp > 1:  # FSDP: the root group and 2 blocks gathered, 1 block's gradients
        root = sum(local_numel(d, s, layout.tp, 1) for n, d, s in tensors if _copies(shape, n) == 1)
        block = sum(local_numel(d, s, layout.tp, 1) for n, d, s in tensors if _copies(shape, n) > 1)
        return a * (root + 3 * block)
    if dtype == "fp32":
        return 0
    # autocast caches a bf16 cast of every matmul weight (a tied head casts the embedding's tensor)
    matmuls = [(n, d, s) for n, d, s in tensors if len(d) == 2 and ("embed" not in n or shape.tied)]
    return sum(a * local_numel(d, s, layout.tp, 1) * _copies(shape, n) for n, d, s in matmuls)


def plan(
    config: Any,
    layout: Layout,
    seq: int,
    micro_batch: int = 1,
    dtype: str = "bf16",
    checkpointing: bool = False,
) -> dict[str, Any]:
    """Per-rank bytes: parameters, gradients, optimizer, working copies, activations, total."""
    shape = config if isinstance(config, Shape) else shape_of(config)
    check(shape, layout, seq, micro_batch, dtype)
    shard = layout.dp_shard * layout.cp
    local = sum(local_numel(d, s, layout.tp, shard) * _copies(shape, n) for n, d, s in parameters(shape))
    act = activations(
        shape, layout, seq, micro_batch, dtype, checkpointing, autocast=dtype == "bf16" and shard == 1
    )
    result = {
        "parameters": 4 * local,
        "gradients": 4 * local,
        "optimizer": 8 * local,
        "working": working_copies(shape, layout, dtype),
        "activations": act["saved"] + act["recompute"],
    }
    result["total"] = sum(result.values())
    result["local_parameters"] = local
    result["total_parameters"] = total_parameters(shape)
    return result


def total_parameters(shape: Shape) -> int:
    return sum(math.prod(d) * _copies(shape, n) for n, d, _ in parameters(shape))


def report(name: str, layout: Layout, seq: int, micro_batch: int, dtype: str, checkpointing: bool,
           device_gib: float) -> str:  # fmt: skip
    r = plan(name, layout, seq, micro_batch, dtype, checkpointing)
    billions = r["total_parameters"] / 1e9, r["local_parameters"] / 1e9
    fsdp = layout.dp_shard * layout.cp > 1
    compute = "fp32" if dtype == "fp32" else "bf16 " + ("FSDP2 mixed precision" if fsdp else "autocast")
    lines = [
        f"{name}: {billions[0]:.2f} B parameters, {billions[1]:.3f} B per rank",
        f"layout {layout} = {layout.world} ranks; {compute}; AdamW; seq {seq}; micro-batch {micro_batch}; "
        f"activation checkpointing {'on' if checkpointing else 'off'}",
        "",
        "| per rank | GiB |",
        "|---|---:|",
    ]
    labels = {
        "parameters": "parameters (fp32)",
        "gradients": "gradients (fp32)",
        "optimizer": "optimizer (AdamW exp_avg + exp_avg_sq, fp32)",
        "working": f"working copies ({'FSDP all-gathers, estimated' if fsdp else 'autocast weight casts'})",
        "activations": f"activations ({dtype})",
        "total": "**total**",
    }
    lines += [f"| {label} | {r[key] / GIB:.2f} |" for key, label in labels.items()]
    verdict = "fits" if r["total"] <= device_gib * GIB else "does NOT fit"
    lines += [
        "",
        f"{verdict} a {device_gib:g} GiB device ({100 * r['total'] / (device_gib * GIB):.0f}% of it)",
    ]
    return "\n".join(lines)


# The layouts of one 8-GPU node (sizes multiply to 8).
NODE_LAYOUTS = [
    Layout(dp_shard=8),
    Layout(dp_replicate=2, dp_shard=4),
    Layout(dp_shard=4, tp=2),
    Layout(dp_shard=2, tp=4),
    Layout(tp=8),
    Layout(dp_replicate=4, tp=2),
    Layout(dp_replicate=8),
]


def _label(layout: Layout) -> str:
    parts = [
        f"{k} {getattr(layout, k)}"
        for k in ("dp_replicate", "dp_shard", "tp", "cp")
        if getattr(layout, k) > 1
    ]
    return " x ".join(parts)


def table(models: tuple[str, ...] = ("llama-3-8b", "llama-3-70b"), seqs: tuple[int, ...] = (4096, 8192),
          device_gib: float = 80.0) -> str:  # fmt: skip
    """Markdown: per-rank GiB of each 8-GPU layout, bf16 mixed, AdamW, micro-batch 1, AC off/on."""
    cols = [(s, ac) for s in seqs for ac in (False, True)]
    head = " | ".join(f"seq {s}, AC {'on' if ac else 'off'}" for s, ac in cols)
    lines = [
        f"Per-rank GiB on 8 x {device_gib:g} GiB (one node), as `bench/memory_plan.py` models it: "
        "bf16 with fp32 master weights, gradients and AdamW state (FSDP2 mixed precision where "
        "dp_shard > 1, autocast otherwise), micro-batch 1, activation checkpointing (AC) off/on; "
        "✓ the total fits, ✗ it does not. "
        "The total leaves out the CUDA context, NCCL buffers and fragmentation (a few GiB): read a ✓ above "
        "~75 GiB as tight. Generated by "
        "`python -m bench.memory_plan --table --out bench/results/memory-plan.md`; "
        "one layout of any model: `python -m bench.memory_plan --model llama-3-8b --dp-shard 8 --seq 4096 "
        "--checkpointing` (or `--model path/to/config.json`).",
        "",
        f"| model | layout | {head} |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for model in models:
        for layout in NODE_LAYOUTS:
            cells = []
            for seq, ac in cols:
                total = plan(model, layout, seq, 1, "bf16", ac)["total"]
                cells.append(f"{total / GIB:.1f} {'✓' if total <= device_gib * GIB else '✗'}")
            lines.append(f"| {model} | {_label(layout)} | {' | '.join(cells)} |")
    lines.append("")
    for model in models:
        for seq in seqs:
            need = smallest_fsdp(model, seq, device_gib)
            lines.append(f"- {model}, seq {seq}, AC on: the smallest FSDP layout that fits is {need}.")
    return "\n".join(lines) + "\n"


def smallest_fsdp(model: str, seq: int, device_gib: float) -> str:
    """The fewest 8-GPU nodes on which FSDP over all GPUs, or FSDP x tp 8, fits with AC on."""
    for nodes in range(1, 65):
        for layout in (Layout(dp_shard=8 * nodes), Layout(dp_shard=nodes, tp=8)):
            total = plan(model, layout, seq, 1, "bf16", True)["total"]
            if total <= device_gib * GIB:
                return f"{_label(layout)} ({8 * nodes} GPUs, {total / GIB:.1f} GiB per rank)"
    return "beyond 512 GPUs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model", default="llama-3-8b", help=f"{', '.join(MODELS)} or a path to a config.json")
    for name in ("dp-replicate", "dp-shard", "tp", "cp"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument(
        "--dtype", choices=tuple(DTYPE_BYTES), default="bf16", help="bf16: mixed, fp32 master weights"
    )
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every layer")
    p.add_argument("--device-gib", type=float, default=80.0, help="memory of one device (an H100 80GB: 79.6)")
    p.add_argument("--table", action="store_true", help="the 8B/70B on 8 x 80 GiB table (Markdown)")
    p.add_argument("--out", help="also write the output to this file")
    args = p.parse_args(argv)
    try:
        if args.table:
            text = table(device_gib=args.device_gib)
        else:
            layout = Layout(args.dp_replicate, args.dp_shard, args.tp, args.cp)
            text = report(args.model, layout, args.seq, args.micro_batch, args.dtype, args.checkpointing,
                          args.device_gib)  # fmt: skip
    except ValueError as err:
        print(f"memory_plan: {err}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        Path(args.out).write_text(text if text.endswith("\n") else text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
