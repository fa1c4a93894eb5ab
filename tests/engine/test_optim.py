from __future__ import annotations

import contextlib
import json
import logging
import math
from enum import Enum

import pytest
import torch
from torch import nn

from ember.args import TrainingArguments
from ember.args.names import SCHEDULER_NAMES
from ember.engine.optim import (
    FormulaLR,
    PlateauLR,
    build_optimizer,
    build_optimizer_from_cls,
    build_param_groups,
    build_scheduler,
    get_decay_parameter_names,
    parse_optim_args,
    warmup_steps_for,
)
from tests.helpers import args_with

LR, WARMUP, TOTAL = 1e-3, 10, 100


def make_args(**overrides):
    fields = dict(
        learning_rate=LR,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        optim_args=None,
        lr_scheduler_type="linear",
        lr_scheduler_kwargs={},
        warmup_steps=WARMUP,
        eval_strategy="steps",  # reduce_lr_on_plateau steps on eval metrics; the others ignore it
    )
    fields.update(overrides)
    return TrainingArguments(output_dir="unused", **fields)


def sgd_on_one_param(lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def lr_curve(scheduler, optimizer, steps: int) -> list[float]:
    curve = []
    for _ in range(steps):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return curve


# Each schedule written out independently of ember/engine/optim.py, as a function of the step.
def _ramp(s):
    return s / WARMUP


def _cos_decay(s, cycles=0.5):
    p = (s - WARMUP) / (TOTAL - WARMUP)
    return max(0.0, 0.5 * (1 + math.cos(2 * math.pi * cycles * p)))


def _restarts(s):
    p = (s - WARMUP) / (TOTAL - WARMUP)
    return 0.0 if p >= 1 else 0.5 * (1 + math.cos(math.pi * ((3 * p) % 1)))


def _poly(s):
    end = 1e-5
    if s > TOTAL:
        return end / LR
    return ((LR - end) * (1 - (s - WARMUP) / (TOTAL - WARMUP)) ** 2 + end) / LR


def _cos_warmup_min(s):
    if s < WARMUP:
        return (s + 1) / WARMUP
    p = (s - WARMUP + 1) / (TOTAL - WARMUP)
    return 0.5 * (1 + math.cos(math.pi * p)) * 0.9 + 0.1


def _wsd(s):  # 10 warmup, 60 stable, 30 decay of kind 1-sqrt to 5%
    if s < WARMUP:
        return 0.05 + 0.95 * s / WARMUP
    if s < 70:
        return 1.0
    if s < 100:
        return 0.05 + 0.95 * (1 - math.sqrt((s - 70) / 30))
    return 0.05


CASES = {
    "linear": ({}, lambda s: _ramp(s) if s < WARMUP else max(0.0, (TOTAL - s) / (TOTAL - WARMUP))),
    "cosine": ({}, lambda s: _ramp(s) if s < WARMUP else _cos_decay(s)),
    "cosine_with_restarts": ({"num_cycles": 3}, lambda s: _ramp(s) if s < WARMUP else _restarts(s)),
    "polynomial": ({"lr_end": 1e-5, "power": 2.0}, lambda s: _ramp(s) if s < WARMUP else _poly(s)),
    "constant": ({}, lambda s: 1.0),
    "constant_with_warmup": ({}, lambda s: _ramp(s) if s < WARMUP else 1.0),
    "inverse_sqrt": ({}, lambda s: _ramp(s) if s < WARMUP else math.sqrt(WARMUP / s)),
    "cosine_with_min_lr": (
        {"min_lr": 1e-4},
        lambda s: _ramp(s) if s < WARMUP else 0.1 + 0.9 * _cos_decay(s),
    ),
    "cosine_warmup_with_min_lr": ({"min_lr_rate": 0.1}, _cos_warmup_min),
    "warmup_stable_decay": (
        {"num_decay_steps": 30, "decay_type": "1-sqrt", "min_lr_ratio": 0.05},
        _wsd,
    ),
}


def test_cases_cover_every_formula_scheduler():
    assert set(CASES) | {"reduce_lr_on_plateau"} == set(SCHEDULER_NAMES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_formula_and_transformers(name):
    kwargs, formula = CASES[name]
    optimizer = sgd_on_one_param()
    scheduler = build_scheduler(
        make_args(lr_scheduler_type=name, lr_scheduler_kwargs=kwargs), optimizer, TOTAL
    )
    curve = lr_curve(scheduler, optimizer, TOTAL + 5)
    expected = [LR * formula(step) for step in range(TOTAL + 5)]
    assert curve == pytest.approx(expected, rel=1e-9, abs=1e-15)

    hf = pytest.importorskip("transformers.optimization")
    hf_optimizer = sgd_on_one_param()
    hf_scheduler = hf.get_scheduler(
        name,
        hf_optimizer,
        num_warmup_steps=WARMUP,
        num_training_steps=TOTAL,
        scheduler_specific_kwargs=kwargs,
    )
    assert curve == lr_curve(hf_scheduler, hf_optimizer, TOTAL + 5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_decay_steps": 30, "warmup_type": "cosine"},
        {"num_decay_steps": 20, "num_stable_steps": 50, "warmup_type": "1-sqrt", "decay_type": "linear"},
    ],
)
def test_warmup_stable_decay_variants_match_transformers(kwargs):
    hf = pytest.importorskip("transformers.optimization")
    optimizer, hf_optimizer = sgd_on_one_param(), sgd_on_one_param()
    args = make_args(lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs=kwargs)
    ours = lr_curve(build_scheduler(args, optimizer, TOTAL), optimizer, TOTAL + 5)
    with pytest.warns(UserWarning) if "num_stable_steps" in kwargs else contextlib.nullcontext():
        theirs_scheduler = hf.get_scheduler(
            "warmup_stable_decay", hf_optimizer, WARMUP, TOTAL, scheduler_specific_kwargs=kwargs
        )
    assert ours == lr_curve(theirs_scheduler, hf_optimizer, TOTAL + 5)


def test_warmup_ratio_and_count():
    assert warmup_steps_for(3, 100) == 3
    assert warmup_steps_for(3.7, 100) == 3
    assert warmup_steps_for(0.05, 30) == 2  # ceil(1.5)
    assert warmup_steps_for(0, 30) == 0
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_steps_for(-1, 30)
    optimizer = sgd_on_one_param()
    scheduler = build_scheduler(make_args(warmup_steps=0.1), optimizer, 50)
    assert scheduler.params["num_warmup_steps"] == 5


def test_inverse_sqrt_without_warmup_uses_hf_timescale():
    optimizer = sgd_on_one_param()
    scheduler = build_scheduler(make_args(lr_scheduler_type="inverse_sqrt", warmup_steps=0), optimizer, TOTAL)
    assert scheduler.params["timescale"] == 10_000
    curve = lr_curve(scheduler, optimizer, 3)
    assert curve[2] == pytest.approx(LR / math.sqrt(1.0002))


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_json_round_trip_continues_identically(name):
    kwargs = CASES[name][0]
    args = make_args(lr_scheduler_type=name, lr_scheduler_kwargs=kwargs)
    optimizer = sgd_on_one_param()
    scheduler = build_scheduler(args, optimizer, TOTAL)
    lr_curve(scheduler, optimizer, 37)
    saved = json.dumps(scheduler.state_dict(), allow_nan=False)
    straight = lr_curve(scheduler, optimizer, 70)

    fresh_optimizer = sgd_on_one_param()
    fresh = build_scheduler(args, fresh_optimizer, TOTAL)
    fresh.load_state_dict(json.loads(saved))
    assert fresh.last_epoch == 37
    fresh_optimizer.param_groups[0]["lr"] = fresh.get_last_lr()[0]  # what optimizer.load_state_dict does
    assert lr_curve(fresh, fresh_optimizer, 70) == straight


def test_loaded_state_keeps_the_checkpoint_schedule_and_warns(caplog):
    optimizer = sgd_on_one_param()
    saved = FormulaLR(optimizer, "linear", {"num_warmup_steps": 0, "num_training_steps": 10})
    lr_curve(saved, optimizer, 4)
    other = FormulaLR(sgd_on_one_param(), "constant", {})
    with caplog.at_level(logging.WARNING, logger="ember.engine.optim"):
        other.load_state_dict(json.loads(json.dumps(saved.state_dict())))
    assert "differs" in caplog.text
    assert other.name == "linear" and other.lr_factor(5) == pytest.approx(0.5)


def test_reduce_lr_on_plateau_reduces_and_round_trips_as_strict_json():
    args = make_args(
        lr_scheduler_type="reduce_lr_on_plateau", lr_scheduler_kwargs={"patience": 1, "factor": 0.5}
    )
    optimizer = sgd_on_one_param()
    scheduler = build_scheduler(args, optimizer, TOTAL)
    assert isinstance(scheduler, PlateauLR)
    json.dumps(scheduler.state_dict(), allow_nan=False)  # fresh state has best=inf
    for metric in (1.0, 1.0, 1.0):
        scheduler.step(metric)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)
    saved = json.dumps(scheduler.state_dict(), allow_nan=False)

    restored = build_scheduler(args, sgd_on_one_param(), TOTAL)
    restored.load_state_dict(json.loads(saved))
    assert restored.state_dict() == scheduler.state_dict()
    assert restored.best == 1.0 and restored.mode_worse == math.inf


class Settings(str, Enum):
    COSINE = "cosine"
    SGD = "sgd"


def test_enum_names_are_accepted():
    optimizer = build_optimizer(make_args(optim=Settings.SGD), nn.Linear(2, 2))
    assert isinstance(optimizer, torch.optim.SGD)
    scheduler = build_scheduler(make_args(lr_scheduler_type=Settings.COSINE), optimizer, TOTAL)
    assert scheduler.name == "cosine"


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("cosine", {"num_cycle": 2}, "num_cycle"),
        ("linear", {"num_cycles": 2}, "num_cycles"),
        ("constant", {"power": 2}, "power"),
        ("cosine", {"num_cycles": "two"}, "num_cycles"),
        ("polynomial", {"lr_end": 1.0}, "lr_end"),
        ("cosine_with_min_lr", {}, "min_lr"),
        ("cosine_with_min_lr", {"min_lr": 1e-5, "min_lr_rate": 0.1}, "min_lr"),
        ("warmup_stable_decay", {}, "num_decay_steps"),
        ("warmup_stable_decay", {"num_decay_steps": 10, "decay_type": "exp"}, "decay_type"),
        ("warmup_stable_decay", {"num_decay_steps": 95}, "num_decay_steps"),
        ("inverse_sqrt", {"timescale": 0}, "timescale"),
        ("reduce_lr_on_plateau", {"patients": 3}, "patients"),
        ("reduce_lr_on_plateau", {"mode": "sideways"}, "sideways"),
    ],
)
def test_bad_scheduler_kwargs_name_the_field(name, kwargs, needle):
    args = make_args(lr_scheduler_type=name, lr_scheduler_kwargs=kwargs)
    with pytest.raises(ValueError, match="lr_scheduler_kwargs") as info:
        build_scheduler(args, sgd_on_one_param(), TOTAL)
    assert needle in str(info.value)


def test_unknown_scheduler_names_the_field_and_choices():
    with pytest.raises(ValueError, match="lr_scheduler_type") as info:
        build_scheduler(make_args(lr_scheduler_type="cosine_annealing"), sgd_on_one_param(), TOTAL)
    assert "warmup_stable_decay" in str(info.value)


# ---------------------------------------------------------------------------- parameter groups


class TinyRMSNorm(nn.Module):  # stands in for LlamaRMSNorm: matched by class name only
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.ln_f = nn.LayerNorm(4)
        self.final = TinyRMSNorm(4)
        self.head = nn.Linear(4, 1, bias=False)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, ids):
        return self.head(self.final(self.ln_f(self.proj(self.embed(ids)))))


def test_param_groups_split_bias_and_norm_weights():
    model = TinyModel()
    groups = build_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert decay == {"embed.weight", "proj.weight", "head.weight"}
    assert no_decay == {"proj.bias", "ln_f.weight", "ln_f.bias", "final.scale"}
    assert "frozen.weight" in get_decay_parameter_names(model)  # decays if unfrozen


def test_empty_group_is_left_out_and_no_trainable_params_is_an_error():
    groups = build_param_groups(nn.LayerNorm(3), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_param_groups(frozen, 0.1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decay_names_match_transformers_trainer(arch):
    transformers = pytest.importorskip("transformers")
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=1, hidden_size=8, intermediate_size=16, num_attention_heads=2, vocab_size=16
        )
        model = transformers.LlamaForCausalLM(config)
    # HF also lists tied duplicates (lm_head.weight); grouping only looks at named_parameters().
    hf_names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert set(get_decay_parameter_names(model)) == hf_names & set(dict(model.named_parameters()))
    assert not any("norm" in n or "ln_" in n for n in get_decay_parameter_names(model))


# ---------------------------------------------------------------------------- optimizers


def quadratic_loss(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    return ((model(x) - 1.0) ** 2).mean()


# The names built from torch (and adafactor, transformers'); tests/test_optimizers.py has every other name.
BUILT_HERE = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor")


@pytest.mark.parametrize("optim", BUILT_HERE)
def test_every_optimizer_lowers_a_quadratic(optim):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    optimizer = build_optimizer(make_args(optim=optim, learning_rate=1e-2), model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    before = quadratic_loss(model).item()
    for _ in range(3):
        optimizer.zero_grad()
        quadratic_loss(model).backward()
        optimizer.step()
    assert quadratic_loss(model).item() < before


def test_adamw_gets_betas_and_eps_from_args():
    args = make_args(adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, optim_args="amsgrad=true")
    optimizer = build_optimizer(args, nn.Linear(2, 2))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.95)
    assert optimizer.defaults["eps"] == 1e-6 and optimizer.defaults["amsgrad"] is True


def test_fused_adamw_runs_on_cpu_without_warning(caplog):
    model = nn.Linear(4, 1)
    with caplog.at_level(logging.WARNING, logger="ember.engine.optim"):
        optimizer = build_optimizer(make_args(optim="adamw_torch_fused"), model)
    assert optimizer.defaults["fused"] is True
    assert not caplog.records
    quadratic_loss(model).backward()
    optimizer.step()


def test_fused_adamw_falls_back_with_one_warning_where_unsupported(caplog):
    model = nn.Linear(4, 1, device="meta")  # no fused kernel exists for meta tensors
    with caplog.at_level(logging.WARNING, logger="ember.engine.optim"):
        optimizer = build_optimizer(make_args(optim="adamw_torch_fused"), model)
    assert not optimizer.defaults["fused"]
    assert all(not g["fused"] for g in optimizer.param_groups)
    assert len(caplog.records) == 1
    assert "fused" in caplog.text and "meta" in caplog.text


def test_parse_optim_args_types_values():
    parsed = parse_optim_args("momentum=0.9, nesterov=True,steps=3,eps1=none,kind=fast")
    assert parsed == {"momentum": 0.9, "nesterov": True, "steps": 3, "eps1": None, "kind": "fast"}
    assert type(parsed["steps"]) is int
    assert parse_optim_args(None) == {} and parse_optim_args("") == {}
    with pytest.raises(ValueError, match="optim_args"):
        parse_optim_args("momentum0.9")


def test_optim_args_reach_the_optimizer():
    sgd = build_optimizer(make_args(optim="sgd", optim_args="momentum=0.9,nesterov=1"), nn.Linear(2, 2))
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True
    assert build_optimizer(make_args(optim="sgd"), nn.Linear(2, 2)).defaults["momentum"] == 0.0
    rms = build_optimizer(make_args(optim="rmsprop", optim_args="alpha=0.9,centered=true"), nn.Linear(2, 2))
    assert rms.defaults["alpha"] == 0.9 and rms.defaults["centered"] is True
    ada = build_optimizer(
        make_args(optim="adafactor", optim_args="eps2=0.01,decay_rate=-0.5"), nn.Linear(2, 2)
    )
    assert ada.defaults["eps"] == (1e-30, 0.01) and ada.defaults["decay_rate"] == -0.5
    ada = build_optimizer(make_args(optim="adafactor", optim_args="clip_threshold=2"), nn.Linear(2, 2))
    assert ada.defaults["eps"] == (1e-30, 1e-3) and ada.defaults["clip_threshold"] == 2.0
    assert (ada.defaults["scale_parameter"], ada.defaults["relative_step"]) == (False, False)


@pytest.mark.parametrize(
    ("optim", "optim_args", "needle"),
    [
        ("sgd", "momentun=0.9", "momentum"),  # lists valid keys
        ("sgd", "weight_decay=0.1", "`weight_decay` field"),
        ("adamw_torch", "lr=0.1", "`learning_rate` field"),
        ("sgd", "momentum=true", "must be a float"),
        ("sgd", "nesterov=2", "must be a bool"),
    ],
)
def test_bad_optim_args_name_the_field(optim, optim_args, needle):
    with pytest.raises(ValueError, match="optim_args") as info:
        build_optimizer(make_args(optim=optim, optim_args=optim_args), nn.Linear(2, 2))
    assert needle in str(info.value)


def test_unknown_optimizer_names_the_field_and_choices():
    with pytest.raises(ValueError, match="optim=") as info:
        build_optimizer(args_with(optim="adamw_apex_fused"), nn.Linear(2, 2))  # args would refuse it
    assert "adamw_torch_fused" in str(info.value) and "adafactor" in str(info.value)


def test_build_optimizer_from_cls_uses_groups_and_weight_decay():
    model = TinyModel()
    optimizer = build_optimizer_from_cls(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, model, make_args())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.defaults["momentum"] == 0.9
    kwargs = {"lr": 0.1, "weight_decay": 0.5}
    optimizer = build_optimizer_from_cls(torch.optim.AdamW, kwargs, model, make_args())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    assert kwargs == {"lr": 0.1, "weight_decay": 0.5}  # caller's dict untouched
    params = [nn.Parameter(torch.zeros(2))]
    optimizer = build_optimizer_from_cls(torch.optim.SGD, {"lr": 0.1, "params": params}, model)
    assert optimizer.param_groups[0]["params"] == params
