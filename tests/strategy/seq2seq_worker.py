"""What each rank runs in the Seq2SeqTrainer multi-process tests:
`python -m tests.strategy.seq2seq_worker SUITE OUT`.

`ddp`: the seq2seq job (tests/seq2seq_job.py) on tiny BART. `sharded`: the same job under FSDP2 and
under DeepSpeed ZeRO-3 (when installed), where generation must run with
`synced_gpus`: the ranks' batches finish generating at different steps, and every rank has to take
part in every forward of the others. Rank 0 writes safetensors + JSON under OUT.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.seq2seq_job import copy_examples, job_trainer, run_job

RANK = int(os.environ.get("RANK", "0"))


def run(out: Path, name: str, kind: str, **kw: object) -> None:
    trainer = job_trainer(str(out / name), kind, **kw)
    tensors, meta = run_job(trainer)
    if trainer.strategy.shards_parameters:
        meta["uneven_lengths"] = uneven_generation(trainer)
    if RANK == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(meta))


def uneven_generation(trainer: Any) -> list[int]:
    """Rank 0 generates 2 new tokens per row, rank 1 six: rank 0 finishes first and must go on
    taking part in rank 1's forwards (synced_gpus), or both hang. The new tokens of each row."""
    pad = trainer.model.config.pad_token_id
    n = 2 if RANK == 0 else 6
    data = copy_examples(6, 3, trainer.model.config.eos_token_id)
    kw = {"num_beams": 1, "max_new_tokens": n, "min_new_tokens": n, "suppress_tokens": [pad]}
    pred = trainer.predict(data, **kw).predictions
    return [int((row[1:] != pad).sum()) for row in pred]


def zero3() -> dict[str, object]:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3},
    }


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=("ddp", "sharded"))
    parser.add_argument("out")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if opts.suite == "ddp":
        run(out, "ddp-bart", "bart")
    else:
        run(out, "fsdp-bart", "bart", fsdp=True)
        if importlib.util.find_spec("deepspeed") is not None:
            run(out, "zero3-bart", "bart", deepspeed=zero3())
    print(f"rank {RANK}: suite {opts.suite} done", file=sys.stderr)


if __name__ == "__main__":
    main()
