"""The name lists users choose from, each written once; plain tuples, so `TrainingArguments` can
validate against them without importing torch.

Each list belongs to the part that implements the names (noted beside it); that part imports the
list from here and its tests check that it implements exactly these names.
"""

from __future__ import annotations

#: `optim`: every name of transformers' `OptimizerNames`, in its order. engine/optim.py builds torch's own;
#: engine/optimizers.py builds the rest from their packages, with transformers' meaning of each name.
OPTIMIZER_NAMES: tuple[str, ...] = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_torch_xla",
    "adamw_torch_npu_fused",
    "adafactor",
    "adamw_anyprecision",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "ademamix",
    "sgd",
    "adagrad",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
    "lomo",
    "adalomo",
    "grokadamw",
    "schedule_free_radam",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "stable_adamw",
)

#: `optim` names no ember run can use (their device is one ember does not run on): `TrainingArguments`
#: refuses them with this reason.
OPTIMIZERS_REFUSED: dict[str, str] = {
    "adamw_torch_xla": "it is torch_xla's syncfree AdamW for XLA devices (TPUs), and ember trains on CPU "
    "and CUDA; use optim='adamw_torch_fused' (or 'adamw_torch')",
    "adamw_torch_npu_fused": "it is torch_npu's fused AdamW for Ascend NPUs, and ember trains on CPU and "
    "CUDA; use optim='adamw_torch_fused' (or 'adamw_torch')",
}

#: `optim` names that project the gradients of the modules `optim_target_modules` names.
LOW_RANK_OPTIMIZERS: tuple[str, ...] = tuple(
    n for n in OPTIMIZER_NAMES if n.startswith(("galore_", "apollo_"))
)

#: `optim` names that update each weight inside backward, as its gradient arrives (so there is no
#: gradient left to accumulate over micro-batches, scale or clip afterwards).
BACKWARD_STEP_OPTIMIZERS: tuple[str, ...] = ("lomo", "adalomo") + tuple(
    n for n in OPTIMIZER_NAMES if n.endswith("_layerwise")
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
