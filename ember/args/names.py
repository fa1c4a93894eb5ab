"""The name lists users choose from, each written once; plain tuples, so `TrainingArguments` can
validate against them without importing torch.

Each list belongs to the part that implements the names (noted beside it); that part imports the
list from here and its tests check that it implements exactly these names.
"""

from __future__ import annotations

#: `optim` (engine/optim.py builds each).
OPTIMIZER_NAMES: tuple[str, ...] = (
    "adamw_torch",
    "adamw_torch_fused",
    "sgd",
    "adagrad",
    "rmsprop",
    "adafactor",
)

#: `lr_scheduler_type` (engine/optim.py: a formula per name, and ReduceLROnPlateau).
SCHEDULER_NAMES: tuple[str, ...] = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)

#: `train_sampling_strategy` (data/loaders.py builds the sampler for each).
SAMPLING_STRATEGIES: tuple[str, ...] = ("random", "sequential", "group_by_length")

#: `nonfinite_step_policy` (engine/guards.py: what a step with NaN/inf gradients does).
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "stop", "ignore")
