"""Rank script of tests/trainer/test_accelerator.py: the transformers-style subclass on 2 processes
(each with half the per-device batch of the one-process reference), then accelerator collectives."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import ember
from tests.trainer.test_accelerator import train_custom


def main(out: Path) -> None:
    trainer = train_custom(ember, str(out / "run"), per_device_train_batch_size=2)
    acc = trainer.accelerator
    rank = acc.process_index
    lines = [f"num_processes={acc.num_processes} process_index={rank} main={acc.is_main_process}"]
    gathered = acc.gather(torch.tensor([float(rank)]))
    total = acc.reduce(torch.tensor(float(rank)))
    mean = acc.reduce(torch.tensor(float(rank)), reduction="mean")
    lines.append(f"gather={gathered.tolist()} reduce_sum={float(total)} reduce_mean={float(mean)}")
    padded = acc.pad_across_processes(torch.full((1, 3 - rank), rank), dim=1, pad_index=-1)
    lines.append(f"pad={acc.gather(padded).tolist()}")
    with acc.split_between_processes(list(range(5))) as share:
        shares = acc.gather_for_metrics([share], use_gather_object=True)
    with acc.split_between_processes(list(range(5)), apply_padding=True) as share:
        padded_shares = acc.gather_for_metrics([share], use_gather_object=True)
    lines.append(f"split={shares} padded={padded_shares}")
    objects = acc.gather_for_metrics(f"r{rank}", use_gather_object=True)
    metrics = acc.gather_for_metrics([rank, 10 + rank])
    lines.append(f"objects={objects} metrics={metrics}")
    lines.append(f"type={acc.distributed_type}")
    # eval_use_gather_object: Python predictions of both ranks, in dataset order, padding rows cut.
    from tests.engine.test_eval_outputs import WordPredictions
    from tests.helpers import RegressionDataset, RegressionModel

    words = WordPredictions(
        model=RegressionModel(),
        args=ember.TrainingArguments(
            output_dir=str(out / "words"),
            report_to="none",
            use_cpu=True,
            per_device_eval_batch_size=2,
            eval_use_gather_object=True,
        ),
    ).predict(RegressionDataset(7))
    lines.append(f"words={words.predictions}")
    with acc.main_process_first():
        pass
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        save_file(state, str(out / "weights.safetensors"))
        (out / "members.txt").write_text("\n".join(lines) + "\n")
    trainer.end()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
