"""What each rank runs in the performance-feature tests: `python -m tests.strategy.perf_worker OUT`.

The chunked loss (DDP with and without find_unused_parameters, FSDP2) and packed batches on 2 ranks,
each rank writing the same LM job's results as `tests.strategy.worker` does, so the pytest process
compares them with the one-process reference (plain loss, padded batches, twice the batch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ember import Trainer
from ember.data import PackingCollator
from ember.engine.chunked_loss import _NOTICED
from tests.strategy.worker import LM_TRAIN, RANK, lm_args, lm_examples, lm_state, losses, tiny_gpt2, write


def run(out: Path, name: str, packed: bool = False, **kw: Any) -> None:
    trainer = Trainer(
        model_init=lambda: tiny_gpt2(seed=0),
        args=lm_args(str(out / name), **kw),
        train_dataset=lm_examples(LM_TRAIN, seed=1),
        data_collator=PackingCollator() if packed else None,
    )
    if not packed:
        from tests.helpers import pad_lm_batch

        trainer.data_collator = pad_lm_batch
    result = trainer.train()
    # the chunked path ran: it falls back only with a notice, and none was given
    assert not _NOTICED, _NOTICED
    write(out, name, lm_state(trainer), {"losses": losses(trainer), "train_loss": result.training_loss})


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    run(out, "chunked", chunked_loss=True, loss_chunk_size=8)
    run(out, "chunked-unused", chunked_loss=True, loss_chunk_size=8, ddp_find_unused_parameters=True)
    run(out, "chunked-fsdp", chunked_loss=True, loss_chunk_size=8, fsdp=True)
    run(out, "packed", packed=True)
    run(out, "packed-chunked", packed=True, chunked_loss=True, loss_chunk_size=8)
    print(f"rank {RANK}: perf suite done", file=sys.stderr)


if __name__ == "__main__":
    main()
