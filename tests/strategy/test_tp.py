"""Tensor parallelism and 2-D layouts through `parallelism_config` (issue 20), on 2 and 4 gloo
processes: each layout trains 12 steps equal to one process with the same global batch, a
checkpoint written at dp 2 x tp 2 resumes at tp 2 and on one process, a kill -9 mid-save keeps the
previous checkpoint whole, and what cannot run is refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ember import Trainer, TrainingArguments
from ember.checkpoint import verify_checkpoint
from tests.pickle_check import assert_no_pickle
from tests.strategy import launch
from tests.strategy.tp_worker import examples, run_job, tiny

WEIGHTS_TOL, LOSS_TOL = 5e-5, 1e-4


def _launch(out: Path, jobs: list[str], nproc: int, timeout: float = 600) -> None:
    launch.check(launch.run(["-m", "tests.strategy.tp_worker", str(out), ",".join(jobs)], nproc, timeout))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every multi-process run of this file, in two launches (4 processes, then 2), plus the
    one-process references and resumes run here."""
    out = tmp_path_factory.mktemp("tp")
    _launch(
        out,
        ["dptp=llama:dp2xtp2:ckpt:eval", "hsdp=llama:hsdp2x2", "ddptp=llama:ddp2xtp2", "qdptp=qwen2:dp2xtp2"],
        nproc=4,
    )
    # The dp2 x tp2 run's checkpoint-4, resumed with other layouts.
    for name in ("resume-tp2", "resume-one"):
        (out / name).mkdir()
        shutil.copytree(out / "dptp" / "checkpoint-4", out / name / "checkpoint-4")
    _launch(
        out,
        [
            "tp2=llama:tp2",
            "qtp2=qwen2:tp2",
            "resume-tp2=llama:tp2:resume",
            "chunk=llama:tp2:chunked",
            "given=llama:tp2:given",
            "auto=llama:tp2:auto",
            "tpac=llama:tp2:ac",
        ],
        nproc=2,
    )
    for spec in ("one=llama:one:eval", "qone=qwen2:one", "resume-one=llama:one:resume"):
        run_job(out, spec)
    return out


def _result(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / name / "result.json").read_text())


def _weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "model" / "model.safetensors"))


def _assert_equal_runs(out: Path, name: str, reference: str) -> None:
    got, ref = _result(out, name), _result(out, reference)
    assert len(got["losses"]) == len(ref["losses"]) == 12
    assert got["losses"] == pytest.approx(ref["losses"], abs=LOSS_TOL)
    assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=LOSS_TOL)
    w, r = _weights(out, name), _weights(out, reference)
    assert set(w) == set(r)  # one consolidated folder: every tensor whole, once
    for key in r:
        assert w[key].shape == r[key].shape, key
        assert float((w[key].float() - r[key].float()).abs().max()) < WEIGHTS_TOL, key


@pytest.mark.parametrize(
    ("name", "reference", "tp", "dp"),
    [
        ("tp2", "one", 2, 1),
        ("dptp", "one", 2, 2),
        ("hsdp", "one", 1, 4),
        ("ddptp", "one", 2, 2),
        ("qtp2", "qone", 2, 1),
        ("qdptp", "qone", 2, 2),
        ("chunk", "one", 2, 1),
        ("given", "one", 2, 1),
        ("auto", "one", 2, 1),  # loaded with from_pretrained(tp_plan="auto"): transformers split it
        ("tpac", "one", 2, 1),  # activation checkpointing, then TP
    ],
)
def test_layout_trains_like_one_process(runs, name, reference, tp, dp):
    _assert_equal_runs(runs, name, reference)
    result = _result(runs, name)
    assert (result["tp_size"], result["dp_world_size"]) == (tp, dp)  # Trainer.get_tp_size is real


def test_evaluation_under_dp2_tp2_counts_each_row_once(runs):
    got, ref = _result(runs, "dptp")["eval"], _result(runs, "one")["eval"]
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    assert got["rows"] == ref["rows"] == 13
    assert got["logits_sum"] == pytest.approx(ref["logits_sum"], rel=1e-5)


def test_chunked_loss_falls_back_under_tp_with_the_reason(runs):
    # chunk trained with chunked_loss=True: the plain loss ran (equal to one process, above).
    assert "split by tensor parallelism" in _result(runs, "chunk")["chunked_fallback"]


def test_a_model_transformers_split_saves_one_plain_folder(runs):
    # Its save_pretrained would gather and wait for every rank; ember saves what it gathered, and
    # the folder carries no distributed settings.
    from transformers import AutoModelForCausalLM

    config = json.loads((runs / "auto" / "model" / "config.json").read_text())
    assert "distributed_config" not in config
    model = AutoModelForCausalLM.from_pretrained(runs / "auto" / "model")
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


def test_saved_model_loads_with_from_pretrained(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs / "dptp" / "model")
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)  # whole, not a TP shard
    assert model.lm_head.weight.shape == (101, 64)


def test_dp2_tp2_checkpoint_is_sharded_pickle_free_and_whole(runs):
    folder = runs / "dptp" / "checkpoint-4"
    assert verify_checkpoint(folder) is None
    assert_no_pickle(folder)
    shards = sorted(p.name for p in (folder / "sharded").iterdir())
    assert len(shards) == 4 and all(s.endswith(".safetensors") for s in shards)


@pytest.mark.parametrize("name", ["resume-tp2", "resume-one"])
def test_dp2_tp2_checkpoint_resumes_with_another_layout(runs, name):
    # Resumed at step 4 with tp 2 (2 processes) or one process: ends where dp2 x tp2 ended.
    got, full = _result(runs, name), _result(runs, "dptp")
    assert got["global_step"] == 12
    assert got["losses"][-8:] == pytest.approx(full["losses"][4:], abs=LOSS_TOL)
    w, r = _weights(runs, name), _weights(runs, "dptp")
    assert max(float((w[k] - r[k]).abs().max()) for k in r) < WEIGHTS_TOL


def test_hsdp_x_tp_on_a_3d_mesh_trains_like_one_process(runs, tmp_path):
    # 8 processes: replicate 2 x shard 2 x TP 2, the layout of TP inside nodes and HSDP across them.
    shutil.copytree(runs / "one", tmp_path / "one")
    _launch(tmp_path, ["h3=llama:hsdp2x2xtp2"], nproc=8)
    _assert_equal_runs(tmp_path, "h3", "one")
    result = _result(tmp_path, "h3")
    assert (result["tp_size"], result["dp_world_size"]) == (2, 4)


def test_kill_9_mid_save_keeps_the_previous_checkpoint(tmp_path):
    # Rank 1 is killed while checkpoint-8's shards are being written: checkpoint-4 stays whole,
    # no checkpoint-8 is published, and the run resumes from checkpoint-4.
    ranks = launch.run(["-m", "tests.strategy.tp_worker", str(tmp_path), "kill=llama:tp2:ckpt:kill8"], 2, 240)
    assert ranks[1].returncode == -9
    assert ranks[0].returncode != 0
    run = tmp_path / "kill"
    assert verify_checkpoint(run / "checkpoint-4") is None
    assert not (run / "checkpoint-8").exists()
    from ember.utils import get_last_checkpoint

    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-4")


# -- refusals, before any work ---------------------------------------------------------------------------


def _args(tmp_path: Path, config: Any, **kw: Any) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", parallelism_config=config, **kw
    )


def test_sizes_that_do_not_multiply_to_the_world_size_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"multiply to 2 .*tp_size=2.*4 process"):
        _args(tmp_path, {"tp_size": 2})
    monkeypatch.delenv("WORLD_SIZE")
    args = _args(tmp_path, {"tp_size": 2})
    with pytest.raises(ValueError, match="multiply to 2.*torchrun --nproc_per_node 2"):
        Trainer(model=tiny("llama"), args=args, train_dataset=examples(4))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"tp_sise": 2}, "unknown key 'tp_sise'. Did you mean 'tp_size'"),
        ({"tp_size": 0}, r"tp_size'\]` must be >= 1"),
        ({"tp_size": 1.5}, "whole number"),
        ({"sp_size": 2}, "Ulysses"),
        ({"tp_plan": {"lm_head": 3}}, "must map module names"),
    ],
)
def test_bad_parallelism_config_is_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, config)


def test_deepspeed_with_parallelism_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`parallelism_config` and `deepspeed` are both set"):
        _args(tmp_path, {"tp_size": 1}, deepspeed={"train_micro_batch_size_per_gpu": 1})


def test_accepted_forms_dict_json_object_parser_and_yaml(tmp_path):
    from accelerate.parallelism_config import ParallelismConfig
    from transformers import HfArgumentParser

    from ember.args.parser import parse_config

    full = {"dp_replicate_size": 1, "dp_shard_size": 2, "tp_size": 2, "cp_size": 1, "sp_size": 1}
    assert _args(tmp_path, {"dp_shard_size": 2, "tp_size": 2}).parallelism_config == full
    assert _args(tmp_path, '{"dp_shard_size": 2, "tp_size": 2}').parallelism_config == full
    assert _args(tmp_path, ParallelismConfig(dp_shard_size=2, tp_size=2)).parallelism_config == full
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        args=[
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--parallelism_config",
            '{"dp_shard_size": 2, "tp_size": 2}',
        ]
    )
    assert args.parallelism_config == full
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("parallelism_config:\n  dp_shard_size: 2\n  tp_size: 2\n")
    values = parse_config(yaml_file)
    assert _args(tmp_path, values["parallelism_config"]).parallelism_config == full


def test_model_without_a_plan_is_refused():
    from ember.strategy.mesh import check_tp_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(
        ValueError, match="carries no tensor-parallel plan.*parallelism_config\\['tp_plan'\\]"
    ):
        check_tp_model(model, 2, None)


def test_head_count_not_divisible_by_tp_size_is_refused():
    from ember.strategy.mesh import check_tp_model

    with pytest.raises(ValueError, match="num_attention_heads=4, which tp_size=3 does not divide"):
        check_tp_model(tiny("llama"), 3, None)


def test_user_plan_is_checked_against_the_model():
    from ember.strategy.mesh import check_tp_model

    model = tiny("llama")
    with pytest.raises(ValueError, match="matches no module"):
        check_tp_model(model, 2, {"model.layers.*.mlp.nope": "colwise"})
    with pytest.raises(ValueError, match="style 'sequence_parallel'.*sequence parallelism needs"):
        check_tp_model(model, 2, {"model.norm": "sequence_parallel"})
    plan = {"model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise"}
    assert check_tp_model(model, 2, plan) == plan


def test_the_model_plan_is_transformers_own():
    from ember.strategy.mesh import check_tp_model

    plan = check_tp_model(tiny("llama"), 2, None)
    assert plan["lm_head"] == "colwise_gather_output"
    assert plan["model.layers.*.self_attn.q_proj"] == "colwise"
    assert plan["model.layers.*.mlp.down_proj"] == "rowwise"
