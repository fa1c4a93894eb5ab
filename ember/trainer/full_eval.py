"""`bf16_full_eval` / `fp16_full_eval`: evaluation outside training runs the model itself in half
precision (cast in place, as transformers does: less memory and faster, at some accuracy). During
train() the evaluations keep the training dtype, so training resumes on the weights it had."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def full_eval_model(model: nn.Module, args: Any, in_train: bool) -> nn.Module:
    if in_train:
        return model
    dtype = torch.float16 if args.fp16_full_eval else torch.bfloat16 if args.bf16_full_eval else None
    return model if dtype is None else model.to(dtype=dtype)
