"""Fine-tuning checks that need a CUDA GPU (H100/H200 sized); on a machine without one it says so and
exits 0.

    python -m bench.gpu_finetune            # all four; results in bench/results/gpu-finetune.json
    python -m bench.gpu_finetune --only qlora,ac

- qlora: GPT-2 124M (built from its config, no download) saved, reloaded in 4-bit NF4 with
  bitsandbytes, LoRA r=16 on attention + MLP, 30 steps bf16: the loss falls, the 4-bit weights stay
  frozen, a checkpoint holds only the adapter and resumes.
- ac: peak CUDA memory of 10 steps with vs without activation_checkpointing (16 x 1024 tokens).
- compile: steps/s with vs without torch_compile, and the first (compiling) step's time.
- auto_batch: per_device_train_batch_size=512 x 1024 tokens, which does not fit; auto_find_batch_size
  must find a micro-batch that fits, keep the global batch, and finish 3 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _gpt2(seq: int = 1024) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_positions=seq))


def _data(n: int, seq: int = 1024) -> list[dict[str, list[int]]]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (n, seq), generator=g).tolist()
    return [{"input_ids": r, "labels": list(r)} for r in ids]


def _collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    import torch

    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def _args(out: str, **kw: Any) -> Any:
    from ember import TrainingArguments

    base: dict[str, Any] = dict(
        output_dir=out, per_device_train_batch_size=16, max_steps=10, learning_rate=2e-4, bf16=True,
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def _losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def check_qlora(tmp: str) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ember import Trainer

    _gpt2().save_pretrained(f"{tmp}/base")
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )

    def init() -> Any:
        base = AutoModelForCausalLM.from_pretrained(
            f"{tmp}/base", quantization_config=quant, device_map="cuda"
        )
        base = prepare_model_for_kbit_training(base)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"])
        return get_peft_model(base, lora)

    args = _args(
        f"{tmp}/qlora", max_steps=30, save_steps=15, save_strategy="steps", activation_checkpointing=True
    )
    trainer = Trainer(model_init=init, args=args, train_dataset=_data(480), data_collator=_collate)
    trainer.train()
    ckpt = Path(f"{tmp}/qlora/checkpoint-15")
    resumed = Trainer(model_init=init, args=args, train_dataset=_data(480), data_collator=_collate)
    resumed.train(resume_from_checkpoint=str(ckpt))
    same = all(
        torch.equal(a, b)
        for (_, a), (_, b) in zip(trainer.model.named_parameters(), resumed.model.named_parameters())
        if a.requires_grad
    )
    losses = _losses(trainer)
    return {
        "first_loss": losses[0], "last_loss": losses[-1], "loss_fell": losses[-1] < losses[0],
        "adapter_only": (ckpt / "adapter_model.safetensors").exists()
        and not (ckpt / "model.safetensors").exists(),
        "resume_bit_exact": same,
    }  # fmt: skip


def _peak_and_speed(tmp: str, name: str, **kw: Any) -> dict[str, Any]:
    import torch

    from ember import Trainer, TrainerCallback

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):  # type: ignore[no-untyped-def]
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(_gpt2(), _args(f"{tmp}/{name}", **kw), train_dataset=_data(320), data_collator=_collate)
    trainer.add_callback(Timer())
    trainer.train()
    torch.cuda.synchronize()
    steps = [b - a for a, b in zip(times, times[1:])]
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_step_s": steps[0] if steps else None,
        "steps_per_s": (len(steps) - 2) / sum(steps[2:]) if len(steps) > 3 else None,
        "losses": _losses(trainer),
    }


def check_ac(tmp: str) -> dict[str, Any]:
    return {
        "off": _peak_and_speed(tmp, "ac-off"),
        "on": _peak_and_speed(tmp, "ac-on", activation_checkpointing=True),
    }


def check_compile(tmp: str) -> dict[str, Any]:
    return {
        "eager": _peak_and_speed(tmp, "eager"),
        "compiled": _peak_and_speed(tmp, "compiled", torch_compile=True),
    }


def check_auto_batch(tmp: str) -> dict[str, Any]:
    from ember import Trainer

    args = _args(f"{tmp}/auto", per_device_train_batch_size=512, max_steps=3, auto_find_batch_size=True)
    trainer = Trainer(_gpt2(), args, train_dataset=_data(1536), data_collator=_collate)
    trainer.train()
    return {
        "found_micro_batch": trainer.state.train_batch_size,
        "steps": trainer.state.global_step,
        "losses": _losses(trainer),
    }


CHECKS = {"qlora": check_qlora, "ac": check_ac, "compile": check_compile, "auto_batch": check_auto_batch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_finetune")
    p.add_argument("--only", default=",".join(CHECKS))
    ns = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu_finetune: no CUDA device here; these checks need a GPU. Nothing was run.")
        return 0
    results: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ns.only.split(","):
            start = time.perf_counter()
            try:
                results[name] = CHECKS[name](tmp)
            except Exception as exc:  # report every check, even after one fails
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            results[name]["wall_s"] = time.perf_counter() - start
            print(name, json.dumps(results[name], default=str)[:2000], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu-finetune.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
