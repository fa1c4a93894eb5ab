"""bench.memory_plan against measurements: per-rank bytes of parameters, gradients and AdamW state of
tiny Llama and Qwen2 models under real layouts (one process; tp 2, FSDP 2 and FSDP 2 in bf16 mixed
precision on 2 gloo processes; dp 2 x tp 2 and HSDP 2 x 2 on 4), and the activations saved for
backward on one process (fp32 and bf16, activation checkpointing off and on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import memory_plan as mp
from tests.bench.memory_plan_worker import ARCHS, BATCH, SEQ, measure, tiny, train_step
from tests.strategy import launch

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = {  # worker layout -> (processes, Layout, dtype)
    "tp": (2, mp.Layout(tp=2), "fp32"),
    "fsdp": (2, mp.Layout(dp_shard=2), "fp32"),
    "fsdp-bf16": (2, mp.Layout(dp_shard=2), "bf16"),
    "dp-tp": (4, mp.Layout(dp_shard=2, tp=2), "fp32"),
    "hsdp": (4, mp.Layout(dp_replicate=2, dp_shard=2), "fp32"),
}
PARTS = ("parameters", "gradients", "optimizer")
TOLERANCE = 0.01  # parameter state: the formula counts the largest rank's shard, which is exact here


def _assert_close(measured: dict[str, int], predicted: dict[str, int], tol: float) -> None:
    for part in measured:
        assert measured[part] == pytest.approx(predicted[part], rel=tol), (part, measured, predicted)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, int]]]:
    """Every rank's bytes per layout and architecture, the largest rank kept (what must fit)."""
    import json

    out: dict[str, dict[str, dict[str, int]]] = {}
    for nproc in (2, 4):
        folder = tmp_path_factory.mktemp(f"ranks{nproc}")
        layouts = ",".join(k for k, (n, _, _) in LAYOUTS.items() if n == nproc)
        launch.check(launch.run(["-m", "tests.bench.memory_plan_worker", str(folder), layouts], nproc, 180))
        ranks = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(nproc)]
        for layout in ranks[0]:
            out[layout] = {
                arch: {part: max(r[layout][arch][part] for r in ranks) for part in PARTS} for arch in ARCHS
            }
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_one_process_state_matches(arch):
    model = tiny(arch)
    got = measure(model, train_step(model))
    _assert_close(got, mp.plan(model.config, mp.Layout(), SEQ, BATCH, "fp32"), TOLERANCE)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_distributed_state_matches(measured, layout, arch):
    nproc, plan_layout, dtype = LAYOUTS[layout]
    assert plan_layout.world == nproc
    predicted = mp.plan(tiny(arch).config, plan_layout, SEQ, BATCH, dtype)
    _assert_close(measured[layout][arch], predicted, TOLERANCE)


def _saved(model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> tuple[int, int]:
    """Bytes of the unique storages saved for backward (parameters left out) plus the logits the
    output holds, as (activations, bf16 casts of the weights: autocast's, recognised by their shape)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {
        s for p in model.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1])
    }
    storages: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = (
                s.nbytes(),
                t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes,
            )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    storages[out.logits.untyped_storage().data_ptr()] = (out.logits.untyped_storage().nbytes(), False)
    out.loss.backward()  # the graph the hooks saw is complete
    return sum(n for n, cast in storages.values() if not cast), sum(
        n for n, cast in storages.values() if cast
    )


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("arch", ARCHS)
def test_activation_formula_matches_saved_tensors(arch, mode, checkpointing):
    model = tiny(arch)
    model.config.use_cache = False
    if mode == "bf16":  # what FSDP2's MixedPrecisionPolicy(param_dtype=bf16) computes in
        model.to(torch.bfloat16)
    if checkpointing:  # as ember's activation_checkpointing=True does it (non-reentrant)
        from ember.models.pipeline import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    model.train()
    seq, batch = 48, 3  # T = 144: no activation is shaped like a weight
    ids = torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(0))
    got, casts = _saved(model, ids, autocast=mode == "autocast")
    dtype = "fp32" if mode == "fp32" else "bf16"
    shape = mp.shape_of(model.config)
    predicted = mp.activations(
        shape, mp.Layout(), seq, batch, dtype, checkpointing, autocast=mode == "autocast"
    )
    # Within 2%: the formula leaves out the RoPE tables and the token ids (0.5-1.2% at this size).
    assert got == pytest.approx(predicted["saved"], rel=0.02)
    assert predicted["saved"] < got  # only those small terms are missing, nothing is double-counted
    if mode == "autocast" and not checkpointing:  # the working copies of a one-process bf16 plan
        assert casts == mp.plan(model.config, mp.Layout(), seq, batch, "bf16")["working"]


def test_tp_plan_is_transformers_plan():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    for config, model in ((LlamaConfig, LlamaForCausalLM), (MistralConfig, MistralForCausalLM),
                          (Qwen2Config, Qwen2ForCausalLM)):  # fmt: skip
        assert config.base_model_tp_plan == mp.TP_PLAN
        assert model._tp_plan == mp.HEAD_TP_PLAN


@pytest.mark.parametrize("name", list(mp.MODELS))
def test_builtin_shapes_count_what_transformers_builds(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**mp.MODELS[name]))
    assert mp.total_parameters(mp.shape_of(name)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "extra", [{"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}, {"head_dim": 32}]
)
def test_parameter_count_of_variants(extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **extra)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert mp.total_parameters(mp.shape_of(config)) == sum(p.numel() for p in model.parameters())


def test_cli_reports_a_layout_and_reads_a_config_json(tmp_path, capsys):
    assert mp.main(["--model", "llama-3-8b", "--dp-shard", "8", "--seq", "4096", "--checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "8.03 B parameters" in out and "| **total** |" in out and "fits a 80 GiB device" in out
    tiny("llama").config.to_json_file(tmp_path / "config.json")
    assert mp.main(["--model", str(tmp_path / "config.json"), "--tp", "2", "--dtype", "fp32"]) == 0
    assert "1 x tp 2 x cp 1 = 2 ranks" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "llama-3-8b", "--tp", "3"], "tp 3 must divide num_attention_heads 32"),
        (["--model", "gpt-5"], "neither a known name"),
        (["--model", "llama-3-8b", "--cp", "3", "--seq", "4096"], "divisible by cp 3"),
        (["--model", "llama-3-8b", "--dp-shard", "0"], "dp_shard must be >= 1"),
    ],
)
def test_bad_input_is_refused_with_the_reason(argv, message, capsys):
    assert mp.main(argv) == 2
    assert message in capsys.readouterr().err


def test_other_architectures_are_refused():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        mp.shape_of({"model_type": "gpt2", "vocab_size": 10})


def test_table_and_its_committed_copy():
    text = mp.table()
    assert (REPO / "bench" / "results" / "memory-plan.md").read_text() == text, (
        "rerun: python -m bench.memory_plan --table --out bench/results/memory-plan.md"
    )
    # 70B with AdamW needs ~1.1 TB of fp32 state: no layout of one 8 x 80 GiB node holds it
    assert all("✗" in line for line in text.splitlines() if line.startswith("| llama-3-70b"))
    assert "| llama-3-8b | dp_shard 8 |" in text
    layout = mp.Layout(dp_shard=8)
    assert mp.plan("llama-3-8b", layout, 4096, 1, "bf16", True)["total"] < 80 * mp.GIB
