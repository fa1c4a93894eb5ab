"""Seq2SeqTrainer / Seq2SeqTrainingArguments beside transformers' classes of those names, on a tiny
BART and a tiny T5 built from configs (offline; transformers runs for real, nothing is mocked).

The copy task's targets all have the same length, so transformers' mean of per-micro-batch means
equals ember's exact token-normalised loss under gradient accumulation; and the models are marked
`accepts_loss_kwargs = False` for transformers, because its default path does not divide their
loss by the accumulation steps (see `test_transformers_does_not_scale_bart_loss_under_accumulation`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ember
from ember import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback
from ember.data.samplers import ResumableBatchSampler
from ember.data.sortish import SortishBatchSampler
from tests.seq2seq_job import MODELS, collator_for, copy_examples, generation_metrics, tiny_bart

transformers = pytest.importorskip("transformers")

SPEED = ("_runtime", "_per_second")
COMMON: dict[str, Any] = dict(
    report_to="none",
    disable_tqdm=True,
    use_cpu=True,
    optim="adamw_torch",
    save_strategy="no",
    seed=0,
)
JOB: dict[str, Any] = dict(
    max_steps=60,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    learning_rate=1e-2,
    logging_steps=15,
    train_sampling_strategy="sequential",
    per_device_eval_batch_size=5,
    predict_with_generate=True,
    generation_num_beams=4,
    generation_max_length=12,
)


def _trainer(lib: Any, kind: str, out: Path, train: bool = True, **kw: Any) -> Any:
    model = MODELS[kind]()
    model.accepts_loss_kwargs = False  # transformers: divide by the accumulation steps (ember ignores it)
    eos = model.config.eos_token_id
    args = lib.Seq2SeqTrainingArguments(output_dir=str(out), **{**COMMON, **JOB, **kw})
    return lib.Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=copy_examples(480, 0, eos) if train else None,
        eval_dataset=copy_examples(15, 1, eos),
        data_collator=collator_for(model),
        compute_metrics=generation_metrics,
    )


def _losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.endswith(SPEED)}


def _assert_same_metrics(got: dict[str, Any], want: dict[str, Any]) -> None:
    got, want = _plain(got), _plain(want)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


@pytest.fixture(scope="module", params=sorted(MODELS))
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both trainers, trained on the same job (GA=2): transformers' and ember's."""
    kind = request.param
    out = tmp_path_factory.mktemp(kind)
    pair = {"kind": kind}
    for name, lib in (("hf", transformers), ("ember", ember)):
        trainer = _trainer(lib, kind, out / name)
        pair[f"{name}_result"] = trainer.train()
        pair[name] = trainer
    return pair


def test_training_losses_match_transformers_under_accumulation(trained):
    hf, em = trained["hf"], trained["ember"]
    assert len(_losses(em)) == 4
    assert _losses(em) == pytest.approx(_losses(hf), rel=1e-5)
    assert trained["ember_result"].training_loss == pytest.approx(
        trained["hf_result"].training_loss, rel=1e-5
    )
    for name, p in hf.model.named_parameters():
        assert torch.allclose(p, dict(em.model.named_parameters())[name], atol=1e-5), name


@pytest.mark.parametrize("gen_kwargs", [{}, {"num_beams": 1}], ids=["beams4-from-args", "greedy-kwarg"])
def test_evaluate_with_generate_matches_transformers(trained, gen_kwargs):
    want = trained["hf"].evaluate(**gen_kwargs)
    got = trained["ember"].evaluate(**gen_kwargs)
    _assert_same_metrics(got, want)
    assert got["eval_rows"] == 15 and got["eval_gen_len"] > 1, "generation must produce real sequences"


@pytest.mark.parametrize(
    "gen_kwargs",
    [{}, {"num_beams": 1}, {"max_length": 7}, {"max_new_tokens": 3}, {"max_new_tokens": 25, "num_beams": 2}],
    ids=["args", "greedy", "max_length", "max_new_tokens", "max_new_tokens-past-default"],
)
def test_predict_returns_transformers_generated_ids(trained, gen_kwargs):
    eos = trained["ember"].model.config.eos_token_id
    test_set = copy_examples(10, 2, eos, fixed_target=False)  # labels of several lengths
    want = trained["hf"].predict(test_set, **gen_kwargs)
    got = trained["ember"].predict(test_set, **gen_kwargs)
    assert got.predictions.shape == want.predictions.shape
    assert np.array_equal(got.predictions, want.predictions)
    assert np.array_equal(got.label_ids, want.label_ids)
    _assert_same_metrics(got.metrics, want.metrics)
    rows = {tuple(r) for r in got.predictions.tolist()}
    assert len(rows) > 2, "the model must generate different sequences for different inputs"


def test_generation_settings_precedence(trained):
    em = trained["ember"]
    pad = em.model.config.pad_token_id
    test_set = copy_examples(5, 3, em.model.config.eos_token_id)
    forced = {"min_new_tokens": 30, "num_beams": 1}  # no EOS: generation runs to its length limit

    def generated_width(**kw: Any) -> tuple[int, int]:
        pred = em.predict(test_set, **forced, **kw).predictions
        # + 1: the decoder start token (T5's is its pad token)
        return int((pred[:, 1:] != pad).sum(axis=1).max()) + 1, pred.shape[1]

    # The arguments' generation_max_length (12) limits it; rows are padded to the model config's 20.
    assert generated_width() == (12, 20)
    # A keyword wins over the arguments ...
    assert generated_width(max_length=6) == (6, 20)
    # ... max_new_tokens too (the decoder start token comes first), and wider than 20 is not cut.
    assert generated_width(max_new_tokens=25) == (26, 26)
    # Without either, the model's generation config decides.
    saved = em.args.generation_max_length
    em.args.generation_max_length = None
    em.model.generation_config.max_length = 9
    try:
        assert generated_width() == (9, 9)
    finally:
        em.args.generation_max_length = saved
        em.model.generation_config.max_length = None


def test_generation_reuses_the_loss_forward_s_encoder_output(trained):
    # transformers encodes each batch twice (the loss's forward, then generate); ember hands the
    # first encoder output to generate: same ids, one encoder pass per batch.
    em = trained["ember"]
    calls = []
    hook = em.model.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    test_set = copy_examples(10, 2, em.model.config.eos_token_id)
    try:
        reused = em.predict(test_set)
        assert len(calls) == 2  # 10 samples, batches of 5
        # asked for attentions, generate encodes again itself (they are not in the loss's output)
        again = em.predict(test_set, output_attentions=True)
        assert len(calls) == 6
    finally:
        hook.remove()
    assert np.array_equal(reused.predictions, again.predictions)


def test_each_named_eval_set_gets_the_call_s_generation_keywords(trained):
    em = trained["ember"]
    eos = em.model.config.eos_token_id
    sets = {"a": copy_examples(5, 4, eos), "b": copy_examples(5, 5, eos)}
    metrics = em.evaluate(sets, max_new_tokens=1)
    full = em.evaluate(sets)
    for name in ("a", "b"):
        assert metrics[f"eval_{name}_gen_len"] <= 1 < full[f"eval_{name}_gen_len"]
    # transformers' Trainer.evaluate calls evaluate() again per named set, without the keywords
    hf = trained["hf"].evaluate(sets, max_new_tokens=1)
    assert hf["eval_a_gen_len"] == full["eval_a_gen_len"]


def test_has_every_member_transformers_seq2seq_trainer_adds():
    added = set(vars(transformers.Seq2SeqTrainer)) - set(vars(transformers.Trainer))
    added -= {"__doc__", "__module__"}
    assert added <= set(dir(Seq2SeqTrainer)), sorted(added - set(dir(Seq2SeqTrainer)))
    assert callable(Seq2SeqTrainer.load_generation_config)


def test_eval_loss_is_sample_weighted_as_transformers_trainer_not_its_seq2seq_trainer(tmp_path):
    # 13 samples in batches of 5. transformers' Seq2SeqTrainer gathers with `gather` instead of
    # `gather_for_metrics`, so the last batch's loss counts 5 times instead of 3; its own Trainer
    # (and ember's, with or without generation) weights each batch by its samples.
    data = copy_examples(13, 6, eos=2, fixed_target=False)
    results = {}
    for name, cls, args_cls in (
        ("hf_trainer", transformers.Trainer, transformers.TrainingArguments),
        ("hf_seq2seq", transformers.Seq2SeqTrainer, transformers.Seq2SeqTrainingArguments),
        ("ember", Seq2SeqTrainer, Seq2SeqTrainingArguments),
    ):
        model = tiny_bart()
        args = args_cls(output_dir=str(tmp_path / name), per_device_eval_batch_size=5, **COMMON)
        trainer = cls(model=model, args=args, eval_dataset=data, data_collator=collator_for(model))
        results[name] = trainer.evaluate()["eval_loss"]
    assert results["ember"] == pytest.approx(results["hf_trainer"], rel=1e-6)
    assert abs(results["hf_seq2seq"] - results["hf_trainer"]) > 1e-4


def test_transformers_does_not_scale_bart_loss_under_accumulation(tmp_path):
    # BART's forward takes **kwargs, so transformers passes it num_items_in_batch and leaves the
    # division to it; BART ignores it and returns a per-micro-batch mean, so the step's loss (and
    # gradient) is the sum of GA means. ember's loss is the step's exact token mean: GA=2 x 4 equals
    # one batch of 8. (If transformers fixes this, update docs/compatibility.md.)
    data = copy_examples(8, 7, eos=2, fixed_target=False)
    first = {}
    for name, lib, ga, batch in (
        ("hf", transformers, 2, 4),
        ("ember", ember, 2, 4),
        ("ember-one-batch", ember, 1, 8),
    ):
        model = tiny_bart()
        args = lib.Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / name),
            max_steps=1,
            logging_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
            train_sampling_strategy="sequential",
            **COMMON,
        )
        trainer = lib.Seq2SeqTrainer(
            model=model, args=args, train_dataset=data, data_collator=collator_for(model)
        )
        trainer.train()
        first[name] = _losses(trainer)[0]
    assert first["ember"] == pytest.approx(first["ember-one-batch"], rel=1e-6)
    assert first["hf"] > 1.8 * first["ember"]


# -- arguments ---------------------------------------------------------------------------------------

SEQ2SEQ_FIELDS = (
    "sortish_sampler",
    "predict_with_generate",
    "generation_max_length",
    "generation_num_beams",
    "generation_config",
)


def test_fields_and_defaults_match_transformers(tmp_path):
    hf_fields = {f.name: f for f in dataclasses.fields(transformers.Seq2SeqTrainingArguments)}
    ours = {f.name: f for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    for name in SEQ2SEQ_FIELDS:
        assert ours[name].default == hf_fields[name].default, name
    hf = transformers.Seq2SeqTrainingArguments(output_dir=str(tmp_path))
    em = Seq2SeqTrainingArguments(output_dir=str(tmp_path))
    assert {n: getattr(em, n) for n in SEQ2SEQ_FIELDS} == {n: getattr(hf, n) for n in SEQ2SEQ_FIELDS}


def test_hf_argument_parser_reads_the_same_flags(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--predict_with_generate", "--generation_num_beams", "4",
            "--generation_max_length", "32", "--generation_config", str(tmp_path / "gen"),
            "--sortish_sampler", "true"]  # fmt: skip
    parsed = {}
    for name, cls in (("hf", transformers.Seq2SeqTrainingArguments), ("ember", Seq2SeqTrainingArguments)):
        (args,) = transformers.HfArgumentParser(cls).parse_args_into_dataclasses(argv)
        parsed[name] = {n: getattr(args, n) for n in SEQ2SEQ_FIELDS}
    assert parsed["ember"] == parsed["hf"]
    assert parsed["ember"]["generation_num_beams"] == 4 and parsed["ember"]["predict_with_generate"] is True


def test_yaml_and_ember_flags_take_a_generation_config_object(tmp_path):
    from ember.args.parser import ArgParser, dataclass_from_dict, parse_config

    path = tmp_path / "run.yaml"
    path.write_text(
        f"output_dir: {tmp_path}\npredict_with_generate: true\ngeneration_num_beams: '2'\n"
        "generation_config: {max_length: 9, num_beams: 3}\n"
    )
    args = dataclass_from_dict(Seq2SeqTrainingArguments, parse_config(path))
    assert args.generation_num_beams == 2 and args.generation_config == {"max_length": 9, "num_beams": 3}
    flags = ArgParser(Seq2SeqTrainingArguments).parse_into_dataclass(
        ["--output_dir", str(tmp_path), "--generation_config", '{"num_beams": 5}', "--predict_with_generate"]
    )
    assert flags.generation_config == {"num_beams": 5} and flags.predict_with_generate is True
    folder = ArgParser(Seq2SeqTrainingArguments).parse_into_dataclass(
        ["--output_dir", str(tmp_path), "--generation_config", str(tmp_path)]
    )
    assert folder.generation_config == str(tmp_path)


def test_to_dict_is_json_with_a_generation_config_object(tmp_path):
    config = transformers.GenerationConfig(num_beams=3, max_length=11)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), generation_config=config)
    out = json.loads(args.to_json_string())
    assert out["generation_config"]["num_beams"] == 3
    assert json.loads(
        Seq2SeqTrainingArguments(output_dir=str(tmp_path), generation_config=tmp_path).to_json_string()
    )["generation_config"] == str(tmp_path)


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"generation_num_beams": 0}, "generation_num_beams"),
        ({"generation_max_length": "12"}, "generation_max_length"),
        ({"predict_with_generate": "yes"}, "predict_with_generate"),
        ({"sortish_sampler": True, "train_sampling_strategy": "sequential"}, "sortish_sampler"),
        ({"generation_config": 3}, "generation_config"),
        ({"generation_config": "{not json"}, "generation_config"),
        ({"generation_beams": 2}, "generation_num_beams"),  # a typo gets a suggestion
    ],
)
def test_bad_values_name_the_field(tmp_path, kw, field):
    with pytest.raises((ValueError, TypeError), match=field):
        Seq2SeqTrainingArguments(output_dir=str(tmp_path), **kw)


# -- the trainer's own checks and settings -----------------------------------------------------------


def test_generation_config_from_a_dict_a_folder_or_an_object(tmp_path):
    folder = tmp_path / "gen"
    transformers.GenerationConfig(num_beams=3, max_length=9).save_pretrained(folder)
    for value in ({"num_beams": 3, "max_length": 9}, str(folder), folder / "generation_config.json",
                  transformers.GenerationConfig(num_beams=3, max_length=9)):  # fmt: skip
        model = tiny_bart()
        args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "o"), generation_config=value, **COMMON)
        Seq2SeqTrainer(model=model, args=args)
        assert (model.generation_config.num_beams, model.generation_config.max_length) == (3, 9), value


def test_generation_config_errors_before_any_work(tmp_path):
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), generation_config=str(tmp_path / "missing"), **COMMON
    )
    with pytest.raises(ValueError, match="generation_config"):
        Seq2SeqTrainer(model=tiny_bart(), args=args)
    # transformers' strict check: early_stopping only means something with beam search
    bad = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), generation_config={"num_beams": 1, "early_stopping": True}, **COMMON
    )
    with pytest.raises(ValueError, match="generation_config"):
        Seq2SeqTrainer(model=tiny_bart(), args=bad)


class CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_prediction_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.steps += 1


def test_no_pad_token_is_an_error_before_any_batch(tmp_path):
    model = tiny_bart()
    collate = collator_for(model)
    model.config.pad_token_id = None
    counter = CountSteps()
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True, **COMMON)
    trainer = Seq2SeqTrainer(
        model=model, args=args, data_collator=collate, compute_metrics=generation_metrics, callbacks=[counter]
    )
    with pytest.raises(ValueError, match="pad_token_id"):
        trainer.evaluate(copy_examples(4, 0, eos=2))
    assert counter.steps == 0


def test_model_init_gets_the_generation_config_on_every_train(tmp_path):
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), generation_config={"num_beams": 3}, max_steps=1, **COMMON
    )
    model = tiny_bart()
    trainer = Seq2SeqTrainer(
        model_init=lambda: tiny_bart(),
        args=args,
        train_dataset=copy_examples(8, 0, eos=2),
        data_collator=collator_for(model),
    )
    trainer.train()
    assert trainer.model.generation_config.num_beams == 3


def test_without_generation_it_evaluates_like_trainer(tmp_path):
    model = tiny_bart()
    data = copy_examples(6, 0, eos=2)

    def shapes(pred: Any) -> dict[str, float]:
        return {
            "dims": float(
                np.asarray(
                    pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
                ).ndim
            )
        }

    plain = ember.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, **COMMON)
    trainer = Seq2SeqTrainer(
        model=model, args=plain, data_collator=collator_for(model), compute_metrics=shapes
    )
    assert trainer.evaluate(data)["eval_dims"] == 3.0  # logits (batch, length, vocab): no generation
    loss_only = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), predict_with_generate=True, prediction_loss_only=True, **COMMON
    )
    trainer = Seq2SeqTrainer(model=model, args=loss_only, data_collator=collator_for(model))
    out = trainer.predict(data)
    assert out.predictions is None and out.metrics["test_loss"] > 0


# -- sortish sampler -----------------------------------------------------------------------------------


def _lengths(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (n,), generator=g).tolist()


def test_sortish_batches_cover_the_epoch_with_less_padding():
    lengths = _lengths(1000)
    sortish = SortishBatchSampler(1000, 4, lengths, seed=3)
    plain = ResumableBatchSampler(1000, 4, seed=3)
    sortish.set_epoch(0)
    plain.set_epoch(0)
    batches = list(sortish)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert lengths[batches[0][0]] == max(lengths), "the longest sample comes first"

    def padding(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    assert padding(batches) < padding(list(plain)) / 5
    # still random: the batch order is not sorted by length, and the next epoch differs
    maxima = [max(lengths[i] for i in b) for b in batches[1:]]
    assert maxima != sorted(maxima, reverse=True)
    sortish.set_epoch(1)
    assert list(sortish) != batches


@pytest.mark.parametrize("drop_last", [False, True])
def test_sortish_order_is_a_function_of_seed_and_epoch_on_every_rank(drop_last):
    lengths = _lengths(103, seed=1)
    ranks = [
        SortishBatchSampler(103, 4, lengths, drop_last=drop_last, seed=5, rank=r, world_size=2)
        for r in (0, 1)
    ]
    for r in ranks:
        r.set_epoch(2)
    full = [list(r) for r in ranks]
    assert len(full[0]) == len(full[1])
    seen = {i for batches in full for b in batches for i in b}
    assert seen == set(range(103)) if not drop_last else len(seen) == 2 * len(full[0]) * 4
    # resuming at batch k of epoch 2 gives exactly the rest of that epoch (the O(1) slice)
    again = SortishBatchSampler(103, 4, lengths, drop_last=drop_last, seed=5, rank=1, world_size=2)
    again.set_epoch(2)
    again.skip_batches(5)
    assert list(again) == full[1][5:]
    assert again.state_dict()["sortish"] is True


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            control.should_training_stop = True


def test_sortish_training_resumes_bit_exactly(tmp_path):
    def run(out: Path, resume: str | None, stop: int | None = None) -> dict[str, torch.Tensor]:
        model = tiny_bart()
        args = Seq2SeqTrainingArguments(
            output_dir=str(out),
            **{**COMMON, "save_strategy": "steps"},
            save_steps=3,
            max_steps=6,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            sortish_sampler=True,
        )
        data = copy_examples(64, 8, eos=2, fixed_target=False, min_len=2, max_len=30)
        trainer = Seq2SeqTrainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=collator_for(model),
            callbacks=[StopAt(stop)] if stop else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        assert isinstance(trainer._train_batch_sampler, SortishBatchSampler)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    straight = run(tmp_path / "a", None)
    run(tmp_path / "b", None, stop=3)
    resumed = run(tmp_path / "b", str(tmp_path / "b" / "checkpoint-3"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_sortish_refuses_a_streamed_dataset(tmp_path):
    class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(copy_examples(4, 0, eos=2))

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), sortish_sampler=True, max_steps=1, **COMMON)
    with pytest.raises(ValueError, match="sortish_sampler"):
        Seq2SeqTrainer(model=tiny_bart(), args=args, train_dataset=Stream())
