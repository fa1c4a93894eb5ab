"""Every `optim` name transformers accepts: built from its own package with transformers' meaning
(the same optimizer, the same updates as transformers' Trainer builds), training a tiny model,
checkpointed without pickle and resumed bit for bit; or refused, naming `optim` and the reason."""

from __future__ import annotations

import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.args.names import BACKWARD_STEP_OPTIMIZERS, LOW_RANK_OPTIMIZERS, OPTIMIZER_NAMES
from ember.checkpoint.state_io import load_state, save_state
from ember.engine.optim import build_optimizer
from ember.engine.optimizers import optimizer_eval_mode, set_optimizer_mode
from tests.pickle_check import assert_no_pickle

pytestmark = pytest.mark.filterwarnings("ignore")

# Names that need a device or package this machine lacks: where they are refused, and the reason.
REFUSED: dict[str, tuple[str, type[Exception], str]] = {
    "adamw_torch_xla": ("args", ValueError, "XLA devices"),
    "adamw_torch_npu_fused": ("args", ValueError, "Ascend NPUs"),
    "adamw_anyprecision": ("build", ImportError, "torchdistx"),
    "adalomo": ("build", ValueError, "needs CUDA"),
    "galore_adamw_8bit": ("build", ValueError, "needs CUDA"),
    "galore_adamw_8bit_layerwise": ("build", ValueError, "needs CUDA"),
}
BUILT = [n for n in OPTIMIZER_NAMES if n not in REFUSED]
# Learning rates at which each moves this model's loss down within a few steps.
LR = {"lion_8bit": 1e-3, "lion_32bit": 1e-3, "paged_lion_32bit": 1e-3, "paged_lion_8bit": 1e-3}
LR.update(dict.fromkeys(("sgd", "schedule_free_sgd"), 0.1))  # lomo: like sgd, but nothing clips it
LR.update(dict.fromkeys(("schedule_free_radam", "adafactor"), 3e-2))
LR.update(dict.fromkeys(("rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"), 1e-3))
STEPS = 8


class Wide(nn.Module):
    """Big enough for quantized state (bitsandbytes and torchao quantize tensors of >= 4096 elements),
    with an embedding (bitsandbytes keeps its state 32-bit), a norm (no weight decay) and linear
    layers (GaLore/APOLLO targets). Returns (loss, prediction) like an HF model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(128, 32)
        self.up = nn.Linear(32, 128)
        self.norm = nn.LayerNorm(128)
        self.down = nn.Linear(128, 1)
        with torch.no_grad():
            self.down.weight.mul_(0.1)  # predictions start near 0, so a few steps show progress

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        pred = self.down(self.norm(torch.tanh(self.up(self.embed(input_ids).mean(1))))).squeeze(-1)
        return (pred,) if labels is None else (nn.functional.mse_loss(pred, labels), pred)


def dataset(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (n, 6), generator=g)
    labels = ids.float().mean(1) / 64 - 1
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def option_fields(name: str) -> dict[str, Any]:
    if name in LOW_RANK_OPTIMIZERS:
        # A small rank, and a new projection at steps 0, 3, 6: a resume at step 4 must restore it.
        return {"optim_target_modules": ["up", "down"], "optim_args": "rank=4,update_proj_gap=3"}
    return {}


def run_args(out: Path, name: str, **overrides: Any) -> TrainingArguments:
    fields: dict[str, Any] = dict(
        output_dir=str(out),
        optim=name,
        learning_rate=LR.get(name, 1e-2),
        max_steps=STEPS,
        save_steps=STEPS // 2,
        per_device_train_batch_size=32,  # the whole data set: every step lowers the same loss
        logging_steps=1,
        seed=0,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        **option_fields(name),
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


class CrashAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            raise KeyboardInterrupt(self.step)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal exactly: tensors bit for bit (dtype too), everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def mean_loss(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    with torch.no_grad():
        return float(model(**batch)[0])


def test_every_transformers_name_is_built_or_refused():
    transformers = pytest.importorskip("transformers")
    assert set(BUILT) | set(REFUSED) == set(OPTIMIZER_NAMES)
    assert tuple(m.value for m in transformers.training_args.OptimizerNames) == OPTIMIZER_NAMES


@pytest.mark.parametrize("name", BUILT)
def test_trains_checkpoints_without_pickle_and_resumes_exactly(tmp_path, name):
    data = dataset()
    reference = Trainer(model_init=Wide, args=run_args(tmp_path / "ref", name), train_dataset=data)
    reference.train()
    # The loss went down (at the eval point, for schedule-free: where train() leaves the weights).
    before, after = mean_loss(Wide(), data), mean_loss(reference.model, data)
    assert after < before, (before, after)

    first = Trainer(model_init=Wide, args=run_args(tmp_path / "run", name), train_dataset=data)
    first.add_callback(CrashAfterSave(STEPS // 2))
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = Trainer(model_init=Wide, args=run_args(tmp_path / "run", name), train_dataset=data)
    resumed.train(resume_from_checkpoint=True)

    assert_same(dict(reference.model.state_dict()), dict(resumed.model.state_dict()), "model")
    assert_same(reference.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    ref_losses = [h["loss"] for h in reference.state.log_history if "loss" in h]
    assert ref_losses == [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert_no_pickle(tmp_path)


# ------------------------------------------------------------------------ transformers' meaning


def _transformers_optimizer(name: str, model: nn.Module, out: Path) -> Any:
    """What transformers' Trainer.create_optimizer builds for these arguments (its own code)."""
    transformers = pytest.importorskip("transformers")
    hf_args = transformers.TrainingArguments(
        output_dir=str(out),
        optim=name,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        **option_fields(name),
    )
    host = types.SimpleNamespace(
        model=model,
        args=hf_args,
        optimizer=None,
        optimizer_cls_and_kwargs=None,
        get_decay_parameter_names=lambda m: transformers.Trainer.get_decay_parameter_names(None, m),
        get_optimizer_cls_and_kwargs=transformers.Trainer.get_optimizer_cls_and_kwargs,
    )
    return transformers.Trainer.create_optimizer(host)


def _settings(optimizer: Any, model: nn.Module) -> Any:
    """An optimizer's hyperparameters, groups by parameter name (the two models are equal copies)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
        | {"params": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    attrs = {
        k: getattr(optimizer, k)
        for k in ("is_paged", "block_size", "bf16_stochastic_round")
        if hasattr(optimizer, k)
    }
    if hasattr(optimizer, "args"):
        attrs["args"] = vars(optimizer.args)
    return groups, attrs


@pytest.mark.parametrize("name", BUILT)
def test_same_optimizer_and_updates_as_transformers_trainer_builds(tmp_path, name):
    data = dataset(16)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    ours_model, theirs_model = Wide(), Wide()
    ours = build_optimizer(run_args(tmp_path, name, learning_rate=1e-2), ours_model)
    if name == "galore_adafactor_layerwise":
        # transformers builds the per-parameter optimizers before it sets relative_step=False, so
        # GaLoreAdafactor refuses them; ember's give each parameter galore_adafactor's update.
        with pytest.raises(ValueError, match="relative_step"):
            _transformers_optimizer(name, Wide(), tmp_path)
        theirs = _transformers_optimizer("galore_adafactor", theirs_model, tmp_path)
        pairs = []
    else:
        theirs = _transformers_optimizer(name, theirs_model, tmp_path)
    if name == "galore_adafactor_layerwise":
        pass
    elif name.endswith("_layerwise"):
        inner_theirs = theirs.optimizer_dict
        pairs = [
            (ours._inner[p], inner_theirs[q])
            for p, q in zip(ours_model.parameters(), theirs_model.parameters())
        ]
        assert [n for n, _ in ours_model.named_parameters()] == [
            n for n, _ in theirs_model.named_parameters()
        ]
    else:
        pairs = [(ours, theirs)]
    for mine, hf in pairs:
        assert isinstance(mine, type(hf)), (type(mine), type(hf))
        assert _settings(mine, ours_model) == _settings(hf, theirs_model)
    set_optimizer_mode(ours, training=True)
    set_optimizer_mode(theirs, training=True)
    for _ in range(3):
        ours_model(**batch)[0].backward()
        ours.step()
        ours.zero_grad()
        loss = theirs_model(**batch)[0]
        if name == "lomo":  # how transformers runs LOMO: accelerate's backward; step() is skipped
            theirs.fused_backward(loss, 1e-2)
            continue
        loss.backward()
        theirs.step()
        theirs.zero_grad()
    assert_same(dict(ours_model.state_dict()), dict(theirs_model.state_dict()), "weights")


# ------------------------------------------------------------------------ state, pickle-free


def _trained(name: str, tmp_path: Path) -> tuple[nn.Module, Any]:
    model = Wide()
    optimizer = build_optimizer(run_args(tmp_path, name), model)
    set_optimizer_mode(optimizer, training=True)
    batch = {k: torch.stack([d[k] for d in dataset(16)]) for k in ("input_ids", "labels")}
    for _ in range(3):
        model(**batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("adamw_8bit", "bitsandbytes 8-bit state and quantization maps; the embedding's state 32-bit"),
        ("adamw_torch_4bit", "torchao's OptimState4bit tensors"),
        ("adamw_torch_8bit", "torchao's OptimState8bit tensors"),
        ("galore_adamw", "GaLore projector objects"),
        ("apollo_adamw", "APOLLO random projector objects (seed, matrix)"),
        ("grokadamw", "GrokAdamW's state, kept in its param groups keyed by parameter"),
    ],
)
def test_state_that_safetensors_cannot_hold_round_trips_exactly(tmp_path, name, what):
    model, optimizer = _trained(name, tmp_path)
    before = optimizer.state_dict()
    save_state(before, tmp_path, "optimizer")
    _, fresh = _trained(name, tmp_path / "other")  # other state, to be overwritten
    fresh.load_state_dict(load_state(tmp_path, "optimizer"))
    assert_same(before, fresh.state_dict())
    if name == "adamw_8bit":
        embed_state, up_state = (fresh.state[p] for p in fresh.param_groups[0]["params"][:2])
        assert embed_state["state1"].dtype == torch.float32  # transformers' 32-bit override
        assert up_state["state1"].dtype == torch.uint8 and up_state["qmap1"].dtype == torch.float32
    elif name.startswith("adamw_torch_"):
        kinds = {type(s["exp_avg"]).__name__ for s in fresh.state.values()}
        assert f"OptimState{name[-4:]}" in kinds
    elif name in ("galore_adamw", "apollo_adamw"):
        projectors = [s["projector"] for s in fresh.state.values() if "projector" in s]
        assert projectors and all(type(p).__name__.endswith("Projector") for p in projectors)
        assert all(isinstance(p.ortho_matrix, torch.Tensor) for p in projectors)
    elif name == "grokadamw":
        inner = fresh.param_groups[0]["state"]
        assert inner and all(any(k is p for p in fresh.param_groups[0]["params"]) for k in inner)


def test_a_state_kind_outside_the_tables_is_refused_when_saved(tmp_path):
    class Opaque:
        pass

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    optimizer.state[optimizer.param_groups[0]["params"][0]]["thing"] = Opaque()
    with pytest.raises(TypeError, match="cannot be stored without pickle"):
        save_state(optimizer.state_dict(), tmp_path, "optimizer")


# ------------------------------------------------------------------------ schedule-free modes


def test_schedule_free_evaluates_and_saves_at_the_eval_point_and_trains_at_the_train_point(tmp_path):
    data = dataset()
    seen: dict[str, Any] = {"modes": [], "mode_in_eval": []}

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            seen["modes"].append(kwargs["optimizer"].param_groups[0]["train_mode"])

    def metrics(prediction: Any) -> dict[str, float]:  # runs inside the evaluation loop
        seen["mode_in_eval"].append(trainer.optimizer.param_groups[0]["train_mode"])
        return {}

    args = run_args(tmp_path, "schedule_free_adamw", eval_strategy="steps", eval_steps=2, max_steps=4)
    trainer = Trainer(
        model_init=Wide,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        callbacks=[Watch()],
        compute_metrics=metrics,
    )
    trainer.train()
    assert seen["modes"] == [True] * 4 and seen["mode_in_eval"] == [False, False]
    # train() ends at the eval point; the saved weights of the last checkpoint are those weights.
    assert trainer.optimizer.param_groups[0]["train_mode"] is False
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    assert torch.allclose(saved["up.weight"], trainer.model.up.weight, rtol=0, atol=1e-6)
    # evaluate() at the eval point leaves the mode as it found it.
    with optimizer_eval_mode(trainer.optimizer):
        assert trainer.optimizer.param_groups[0]["train_mode"] is False
    set_optimizer_mode(trainer.optimizer, training=True)
    at_train_point = trainer.model.up.weight.detach().clone()
    trainer.evaluate()
    assert trainer.optimizer.param_groups[0]["train_mode"] is True
    # Back at the train point (the eval -> train round trip is exact up to float rounding).
    assert torch.allclose(trainer.model.up.weight, at_train_point, rtol=0, atol=1e-6)
    assert not torch.allclose(saved["up.weight"], at_train_point, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------ transformers' Adafactor


def test_adafactor_is_transformers_adafactor_and_learns_a_tiny_llama_in_8_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.helpers import lm_examples, pad_lm_batch, tiny_llama

    examples = lm_examples(16)
    args = TrainingArguments(
        str(tmp_path),
        optim="adafactor",
        learning_rate=3e-3,
        max_steps=8,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    model = tiny_llama(0)
    batch = pad_lm_batch(examples)
    with torch.no_grad():
        before = float(model(**batch).loss)
    trainer = Trainer(model, args, train_dataset=examples, data_collator=pad_lm_batch)
    trainer.train()
    assert type(trainer.optimizer) is transformers.optimization.Adafactor
    group = trainer.optimizer.param_groups[0]
    assert (group["scale_parameter"], group["relative_step"]) == (False, False)
    with torch.no_grad():
        assert float(model(**batch).loss) < before - 0.05


# ------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_names_say_optim_and_why(tmp_path, name):
    stage, error, reason = REFUSED[name]
    if stage == "args":
        with pytest.raises(error, match="`optim`") as info:
            run_args(tmp_path, name)
    else:
        args = run_args(tmp_path, name)
        with pytest.raises(error, match="optim=") as info:
            build_optimizer(args, Wide())
    assert reason in str(info.value) and name in str(info.value)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"optim": "galore_adamw"}, "`optim_target_modules`"),
        ({"optim": "apollo_adamw", "optim_target_modules": []}, "`optim_target_modules`"),
        ({"optim": "adamw_torch", "optim_target_modules": "all-linear"}, "read only by the galore_*"),
        ({"optim": "lomo", "gradient_accumulation_steps": 2}, "gradient_accumulation_steps=1"),
        (
            {
                "optim": "galore_adamw_layerwise",
                "optim_target_modules": "up",
                "gradient_accumulation_steps": 4,
            },
            "inside backward",
        ),
        ({"optim": "lomo", "fp16": True}, "loss scale"),
        ({"optim_target_modules": 3}, "`optim_target_modules` must be"),
    ],
)
def test_optimizer_fields_that_cannot_work_are_refused_when_built(fields, needle):
    with pytest.raises(ValueError) as info:
        TrainingArguments("unused", use_cpu=True, **fields)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("name", "optim_args", "needle"),
    [
        ("adamw_8bit", "min_8bit_size=1", "it reads none"),
        ("ademamix", "beta3=high", "must be a float"),
        ("galore_adamw", "rank=4.5", "must be a int"),
        ("adamw_torch_8bit", "block_size=128,bf16_stochastic_round=maybe", "must be a bool"),
        ("grokadamw", "lr=1", "`learning_rate` field"),
    ],
)
def test_bad_optim_args_of_the_new_names_name_the_field(tmp_path, name, optim_args, needle):
    args = run_args(tmp_path, name, optim_args=optim_args)
    with pytest.raises(ValueError, match="optim_args") as info:
        build_optimizer(args, Wide())
    assert needle in str(info.value)


def test_optim_args_reach_the_new_optimizers(tmp_path):
    ademamix = build_optimizer(
        run_args(tmp_path, "ademamix", optim_args="beta3=0.999,alpha=4,t_alpha=10"), Wide()
    )
    assert ademamix.defaults["betas"] == (0.9, 0.999, 0.999) and ademamix.defaults["alpha"] == 4.0
    assert ademamix.defaults["t_alpha"] == 10
    torchao = build_optimizer(run_args(tmp_path, "adamw_torch_4bit", optim_args="block_size=128"), Wide())
    assert torchao.block_size == 128
    galore = build_optimizer(run_args(tmp_path, "galore_adamw", optim_args="rank=2,proj_type=left"), Wide())
    target = galore.param_groups[-1]
    assert (target["rank"], target["proj_type"], target["scale"]) == (2, "left", 0.25)
    stable = build_optimizer(
        run_args(tmp_path, "stable_adamw", optim_args="decouple_lr=false,max_lr=0.1"), Wide()
    )
    assert stable.defaults["decouple_lr"] is False and stable.defaults["max_lr"] == 0.1
    sf = build_optimizer(
        run_args(tmp_path, "schedule_free_adamw", warmup_steps=5, optim_args="r=0.5"), Wide()
    )
    assert (sf.defaults["warmup_steps"], sf.defaults["r"]) == (5, 0.5)


def test_schedule_free_refuses_a_warmup_ratio(tmp_path):
    with pytest.raises(ValueError, match="warmup_steps=0.1 is a ratio"):
        build_optimizer(run_args(tmp_path, "schedule_free_adamw", warmup_steps=0.1), Wide())


def test_backward_step_optimizers_leave_no_gradient_and_an_empty_step(tmp_path):
    for name in ("lomo", "galore_adamw_layerwise"):
        assert name in BACKWARD_STEP_OPTIMIZERS
        model = Wide()
        optimizer = build_optimizer(run_args(tmp_path, name), model)
        before = model.up.weight.detach().clone()
        batch = {k: torch.stack([d[k] for d in dataset(8)]) for k in ("input_ids", "labels")}
        model(**batch)[0].backward()
        assert all(p.grad is None for p in model.parameters())  # every update happened in backward
        assert not torch.equal(model.up.weight, before)
        after = model.up.weight.detach().clone()
        with warnings.catch_warnings():
            optimizer.step()
        assert torch.equal(model.up.weight, after)
