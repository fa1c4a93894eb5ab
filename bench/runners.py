"""The three implementations of one job: a raw PyTorch loop, and a Trainer (ember's or transformers').

ember and transformers share one code path here, because they share one interface: the same
`TrainingArguments` keywords and the same `Trainer(...)` call are handed to either library. The
raw loop is the baseline ember must match, written as a careful engineer would write it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .workloads import StreamingAccuracy, Workload, collate, full_accuracy, token_hits


class StepClock:
    """Timestamps at the end of each optimizer step (or eval batch).

    One device synchronisation at the end of step `warmup` anchors the steady-state measurement:
    `steady_step_ms` = (end of run, synchronised) - (end of step `warmup`), divided by the steps in
    between, so queued GPU work is counted and the first steps (allocator, compile) are not.
    """

    def __init__(self, device: torch.device, total: int) -> None:
        self.device = device
        self.warmup = min(10, max(total // 3, 1)) if total > 1 else 0
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.first_step_wall: float | None = None

    def tick(self) -> None:
        if len(self.times) == self.warmup:
            _sync(self.device)
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if self.first_step_wall is None:
            self.first_step_wall = time.time()

    def summary(self, end: float) -> dict[str, Any]:
        out: dict[str, Any] = {"ticks": len(self.times), "first_step_wall": self.first_step_wall}
        for key, series in (("step_ms_median", self.times), ("step_cpu_ms_median", self.cpu)):
            diffs = [b - a for a, b in zip(series, series[1:])]
            out[key] = 1e3 * statistics.median(diffs) if diffs else None
        after = len(self.times) - 1 - self.warmup
        if after > 0:
            out["steady_step_ms"] = 1e3 * (end - self.times[self.warmup]) / after
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(name: str) -> torch.device:
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- raw PyTorch --------------------------------------------------------------------------------------


def _no_decay(model: nn.Module) -> set[str]:
    """Biases and normalisation weights are not decayed (what both trainers do, too)."""
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or "Norm" in type(module).__name__:
                names.add(full)
    return names


def raw_optimizer(model: nn.Module, w: Workload, device: torch.device) -> torch.optim.Optimizer:
    skip = _no_decay(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n not in skip], "weight_decay": w.weight_decay},
        {"params": [p for n, p in params if n in skip], "weight_decay": 0.0},
    ]
    # fused AdamW: one kernel for all parameters, on CPU and CUDA (torch >= 2.4).
    return torch.optim.AdamW(groups, lr=w.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def linear_warmup(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _raw_save(model: Any, optimizer: Any, scheduler: Any, step: int, out: Path) -> None:
    """Model as save_pretrained writes it, plus what resuming needs: optimizer, scheduler, step."""
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    getattr(model, "_orig_mod", model).save_pretrained(folder)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
    torch.save(state, folder / "training_state.pt")


def raw_train(model: nn.Module, data: list[Any], w: Workload, ctx: dict[str, Any]) -> dict[str, Any]:
    """AdamW + linear warmup/decay, clipping, set_to_none, logging every `logging_steps`."""
    device, clock, out = ctx["device"], ctx["clock"], Path(ctx["output_dir"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx["bf16"])
    start, cpu = time.perf_counter(), time.process_time()
    model.to(device).train()
    optimizer = raw_optimizer(model, w, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(w.warmup_steps, w.steps))
    loader = DataLoader(
        data, batch_size=w.batch, shuffle=False, collate_fn=collate, pin_memory=device.type == "cuda"
    )
    batches = iter(loader)
    since_log, total_loss = torch.zeros((), device=device), 0.0
    for step in range(1, w.steps + 1):
        for _ in range(w.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            with autocast:
                # Fixed-length sequences: every micro-batch has the same target count, so the mean
                # over micro-batch means is the exact step mean.
                loss = model(**batch).loss / w.grad_accum
            loss.backward()
            since_log += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), w.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
        if step % w.logging_steps == 0:
            logged = since_log.item()
            total_loss += logged
            since_log.zero_()
            lr = scheduler.get_last_lr()[0]
            print({"loss": logged / w.logging_steps, "grad_norm": grad_norm.item(), "learning_rate": lr})
        if w.save_steps and step % w.save_steps == 0:
            _raw_save(model, optimizer, scheduler, step, out)
    total_loss += since_log.item()
    end = time.perf_counter()
    return {
        "main_s": end - start,
        "main_cpu_s": time.process_time() - cpu,
        "end": end,
        "steps": w.steps,
        "train_loss": total_loss / w.steps,
    }


def raw_eval(model: nn.Module, data: list[Any], w: Workload, ctx: dict[str, Any]) -> dict[str, Any]:
    """A plain evaluation loop: mean loss (sample-weighted, as the trainers) and token accuracy."""
    device, clock = ctx["device"], ctx["clock"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx["bf16"])
    start, cpu = time.perf_counter(), time.process_time()
    model.to(device).eval()
    loader = DataLoader(data, batch_size=w.eval_batch, shuffle=False, collate_fn=collate)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = correct = targets = 0
    with torch.inference_mode(), autocast:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = model(**batch)
            size = batch["input_ids"].shape[0]
            loss_sum += out.loss.double() * size
            samples += size
            hits, count = token_hits(out.logits, batch["labels"])
            correct, targets = correct + hits, targets + count
            clock.tick()
    end = time.perf_counter()
    return {
        "main_s": end - start,
        "main_cpu_s": time.process_time() - cpu,
        "end": end,
        "steps": len(clock.times),
        "eval_loss": float(loss_sum) / samples,
        "eval_accuracy": correct / max(targets, 1),
    }


# -- ember / transformers Trainer --------------------------------------------------------------------


def timer_callback(base: type, clock: StepClock) -> Any:
    """A callback of the library's own base class that ticks `clock` after each step or eval batch."""

    class StepTimer(base):  # type: ignore[misc,valid-type]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.tick()

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.tick()

    return StepTimer()


def trainer_arguments(w: Workload, ctx: dict[str, Any], accumulate: bool) -> dict[str, Any]:
    """Keywords valid for both `ember.TrainingArguments` and `transformers.TrainingArguments`."""
    return {
        "output_dir": ctx["output_dir"],
        "max_steps": w.steps,
        "per_device_train_batch_size": w.batch,
        "per_device_eval_batch_size": w.eval_batch,
        "gradient_accumulation_steps": w.grad_accum,
        "learning_rate": w.lr,
        "weight_decay": w.weight_decay,
        "max_grad_norm": w.max_grad_norm,
        "lr_scheduler_type": "linear",
        "warmup_steps": w.warmup_steps,
        "optim": "adamw_torch_fused",
        "logging_strategy": "steps",
        "logging_steps": w.logging_steps,
        "save_strategy": "steps" if w.save_steps else "no",
        "save_steps": w.save_steps or 500,
        "eval_strategy": "no",
        "batch_eval_metrics": w.is_eval and not accumulate,
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "report_to": "none",
        "bf16": ctx["bf16"],
        # transformers refuses bf16 on a CPU-only machine unless told the CPU is meant.
        "use_cpu": ctx["device"].type == "cpu",
        "seed": 42,
    }


def trainer_run(
    lib: Any, model: nn.Module, data: list[Any], w: Workload, ctx: dict[str, Any]
) -> dict[str, Any]:
    """Build `lib.Trainer` as a user would, then time `train()` (or `evaluate()` for eval jobs)."""
    accumulate = ctx["variant"] == "accum"
    clock = ctx["clock"]
    t0 = time.perf_counter()
    args = lib.TrainingArguments(**trainer_arguments(w, ctx, accumulate))
    metrics_fn = (full_accuracy if accumulate else StreamingAccuracy()) if w.is_eval else None
    trainer = lib.Trainer(
        model=model,
        args=args,
        data_collator=collate,
        train_dataset=None if w.is_eval else data,
        eval_dataset=data if w.is_eval else None,
        compute_metrics=metrics_fn,
        callbacks=[timer_callback(lib.TrainerCallback, clock)],
    )
    start, cpu = time.perf_counter(), time.process_time()
    result: dict[str, Any] = {"setup_s": start - t0}
    if w.is_eval:
        metrics = trainer.evaluate()
        result.update(eval_loss=metrics.get("eval_loss"), eval_accuracy=metrics.get("eval_accuracy"))
    else:
        output = trainer.train()
        result.update(train_loss=float(output.training_loss), global_step=int(output.global_step))
    _sync(ctx["device"])
    end = time.perf_counter()
    result.update(main_s=end - start, main_cpu_s=time.process_time() - cpu, end=end, steps=len(clock.times))
    last_log = [h for h in trainer.state.log_history if "loss" in h]
    result["last_logged_loss"] = last_log[-1]["loss"] if last_log else None
    return result
