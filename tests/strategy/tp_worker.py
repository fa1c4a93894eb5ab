"""One rank of tests/strategy/test_tp.py: `python -m tests.strategy.tp_worker OUT JOB[,JOB...]`.

A job is `NAME=ARCH:LAYOUT[:OPTION...]`, e.g. `tp2=llama:tp2`. Several jobs run in one launch (the
process group is shared), so the start-up cost of 4 processes is paid once. Each job trains the
tiny model 12 steps on the same 48 examples with a global batch of 4 and writes (rank 0) the
consolidated model (`save_model`) to OUT/NAME/model and its logged losses to OUT/NAME/result.json.

Layouts: one (no parallelism_config: the reference), tp2, dp2xtp2 (FSDP2 over dp_shard x TP),
hsdp2x2 (dp_replicate x dp_shard), ddp2xtp2 (dp_replicate x TP, 2 micro-batches per step),
hsdp2x2xtp2 (3-D, 8 processes), and the context-parallel ones of test_cp.py (cp2, dp2xcp2, ...).
Options (besides): padded (SEQ - 1 tokens with right padding), packed (two documents per row).
Options: ckpt (save every 4 steps, keep them), resume (resume from OUT/NAME's last checkpoint:
the folder is copied there by the test), kill8 (rank 1 kills itself with SIGKILL while writing
its shards of checkpoint-8), chunked (chunked_loss=True, which falls back under TP), eval (evaluate
13 examples after training: rows gathered over the data-parallel ranks only), given (the model is
split by this script with torch's parallelize_module before the Trainer sees it, as
`from_pretrained(tp_plan="auto")` hands it over: ember takes it as it is), auto (the model really
loaded with `from_pretrained(tp_plan="auto")`), ac (activation checkpointing), compile (torch_compile).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ember import Trainer, TrainingArguments

RANK = int(os.environ.get("RANK", "0"))
STEPS, GLOBAL_BATCH, SEQ, VOCAB = 12, 4, 16, 101

LAYOUTS: dict[str, dict[str, int] | None] = {
    "one": None,
    "tp2": {"tp_size": 2},
    "dp2xtp2": {"dp_shard_size": 2, "tp_size": 2},
    "hsdp2x2": {"dp_replicate_size": 2, "dp_shard_size": 2},
    "ddp2xtp2": {"dp_replicate_size": 2, "tp_size": 2},
    # Context parallelism (tests/strategy/test_cp.py): each sequence split over 2 ranks.
    "cp2": {"cp_size": 2},
    "dp2xcp2": {"dp_shard_size": 2, "cp_size": 2},
    "cp2xtp2": {"cp_size": 2, "tp_size": 2},
    "ddp2xcp2": {"dp_replicate_size": 2, "cp_size": 2},
    # 3-D: HSDP (replicate 2 x shard 2) x TP 2 on 8 processes.
    "hsdp2x2xtp2": {"dp_replicate_size": 2, "dp_shard_size": 2, "tp_size": 2},
}


def tiny(arch: str) -> Any:
    """hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 101 (odd: shards split it unevenly)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def examples(
    n: int = STEPS * GLOBAL_BATCH, padded: bool = False, packed: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Random rows of SEQ tokens; `padded`: SEQ - 1 tokens (not a multiple of 2 x cp) whose last
    1-5 are right padding (attention_mask 0, label -100); `packed`: each row two documents of
    5 and SEQ - 5 tokens, told apart by position_ids that restart at 0 (no attention_mask)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    if packed:
        positions = torch.cat([torch.arange(5), torch.arange(SEQ - 5)])
        return [{"input_ids": row, "labels": row.clone(), "position_ids": positions} for row in ids]
    if not padded:
        return [{"input_ids": row, "labels": row.clone()} for row in ids]
    rows = []
    for i, row in enumerate(ids[:, : SEQ - 1]):
        real = SEQ - 1 - (1 + i % 5)
        mask = (torch.arange(SEQ - 1) < real).long()
        labels = torch.where(mask.bool(), row, torch.full_like(row, -100))
        rows.append({"input_ids": row, "attention_mask": mask, "labels": labels})
    return rows


def kill_rank_1_mid_save(step: int) -> None:
    """Rank 1 dies (SIGKILL: no handler, no cleanup) once its shards of checkpoint-`step` are on disk,
    before the ranks agree and rank 0 publishes the folder."""
    import signal

    from ember.checkpoint import sharded

    original = sharded.save_sharded

    def save_then_die(tensors, groups, folder, is_main, process_group):  # type: ignore[no-untyped-def]
        original(tensors, groups, folder, is_main, process_group)
        if RANK == 1 and folder.name.startswith(f"checkpoint-{step}"):
            os.kill(os.getpid(), signal.SIGKILL)

    sharded.save_sharded = save_then_die


def args_for(out: Path, layout: str, options: list[str]) -> TrainingArguments:
    sizes = LAYOUTS[layout]
    dp = 1 if sizes is None else sizes.get("dp_replicate_size", 1) * sizes.get("dp_shard_size", 1)
    accumulation = 2 if layout in ("ddp2xtp2", "ddp2xcp2") else 1
    kw: dict[str, Any] = {"save_strategy": "no"}
    if "ckpt" in options or "resume" in options:
        kw.update(save_strategy="steps", save_steps=4, save_total_limit=None)
    if "kill8" in options:
        kw.update(ddp_timeout=60)
    if "chunked" in options:
        kw.update(chunked_loss=True, loss_chunk_size=8)
    if "ac" in options:
        kw.update(gradient_checkpointing=True)
    if "compile" in options:
        kw.update(torch_compile=True)
    return TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // dp // accumulation,
        gradient_accumulation_steps=accumulation,
        learning_rate=3e-3,
        warmup_steps=2,
        logging_steps=1,
        seed=7,
        report_to="none",
        disable_tqdm=True,
        parallelism_config=dict(sizes) if sizes is not None else None,
        **kw,
    )


def split_beforehand(model: Any) -> Any:
    """TP applied outside ember, on a mesh of this script's own (the group is started here)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from ember.strategy.mesh import model_tp_plan, tp_style

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),), mesh_dim_names=("tp",))
    styles = {k: s for k, v in model_tp_plan(model, None).items() if (s := tp_style(v, k)) is not None}
    parallelize_module(model, mesh, styles)
    return model


def load_tp_auto(arch: str, folder: Path) -> Any:
    """The tiny model saved once, then loaded by every rank with transformers' own TP loader
    (`from_pretrained(tp_plan="auto")`, which starts the process group and splits the weights)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    source = folder / "source"
    if RANK == 0:
        tiny(arch).save_pretrained(source)
    if dist.is_initialized():
        dist.barrier()
    else:  # the group does not exist yet: wait for rank 0's files on the filesystem
        import time

        while not (source / "config.json").exists() or not (source / "model.safetensors").exists():
            time.sleep(0.2)
        time.sleep(0.5)
    return AutoModelForCausalLM.from_pretrained(source, tp_plan="auto")


def run_job(out: Path, spec: str) -> None:
    name, _, rest = spec.partition("=")
    arch, layout, *options = rest.split(":")
    folder = out / name
    if "kill8" in options:
        kill_rank_1_mid_save(8)
    if "auto" in options:
        model = load_tp_auto(arch, folder)
    else:
        model = split_beforehand(tiny(arch)) if "given" in options else tiny(arch)
    padded = "padded" in options
    if "packed" in options:
        # transformers honours packed position_ids only without a KV cache (ember's context
        # parallelism runs without one); the one-process reference must too.
        model.config.use_cache = False
    lengths: set[int] = set()  # the sequence lengths the model computed on in training

    def record(module, args):  # type: ignore[no-untyped-def]
        if module.training:
            lengths.add(int(args[0].shape[1]))

    model.get_input_embeddings().register_forward_pre_hook(record)
    trainer = Trainer(
        model=model,
        args=args_for(folder, layout, options),
        train_dataset=examples(padded=padded, packed="packed" in options),
    )
    result = trainer.train(resume_from_checkpoint=True if "resume" in options else None)
    trainer.save_model(str(folder / "model"))
    metrics = None
    if "eval" in options:  # collectives: every rank
        metrics = trainer.evaluate(eval_dataset=examples(13, padded))
        predictions = trainer.predict(examples(13, padded)).predictions
        metrics["rows"] = int(predictions.shape[0])
        metrics["logits_sum"] = float(abs(predictions).sum())
    if RANK == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        meta = {
            "losses": losses,
            "train_loss": result.training_loss,
            "tp_size": trainer.get_tp_size(),
            "cp_size": trainer.get_cp_size(),
            "trained_lengths": sorted(lengths),
            "dp_world_size": trainer.strategy.dp_world_size,
            "global_step": trainer.state.global_step,
        }
        if metrics is not None:
            meta["eval"] = metrics
        if "chunked" in options:
            from ember.engine.chunked_loss import why_not

            meta["chunked_fallback"] = why_not(trainer.model_wrapped)
        (folder / "result.json").write_text(json.dumps(meta))


def main(out: str, jobs: str) -> None:
    torch.set_num_threads(1)
    for spec in jobs.split(","):
        run_job(Path(out), spec)


if __name__ == "__main__":
    main(*sys.argv[1:])
