"""`Seq2SeqTrainer`: the Trainer for encoder-decoder models (T5, BART, Marian, Whisper), with
evaluation and prediction by generation, as transformers' class of that name.

With `predict_with_generate=True` (`Seq2SeqTrainingArguments`), `evaluate()` and `predict()` return
generated token ids as predictions (for ROUGE, BLEU) and still report the loss on the labels.
Generation settings, strongest first: keywords passed to evaluate()/predict() (`max_length`,
`max_new_tokens`, `num_beams`, any `generate` keyword), then `generation_max_length` /
`generation_num_beams`, then the model's generation config (`generation_config` replaces it).

Generated ids and labels come back padded as transformers pads them, so arrays, metrics and
scripts match: each batch is padded with the pad token to the generation config's `max_length`
(or `max_new_tokens + 1`), and batches (and ranks) of other lengths are joined padded with -100.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data import is_iterable_dataset
from .trainer import Trainer

if TYPE_CHECKING:
    from ..args import TrainingArguments
    from ..outputs import PredictionOutput

__all__ = ["Seq2SeqTrainer"]

# transformers' GenerationConfig leaves max_length unset and generates with this.
_DEFAULT_MAX_LENGTH = 20


class Seq2SeqTrainer(Trainer):
    """Drop-in for `transformers.Seq2SeqTrainer`: `Trainer` plus generation in evaluate/predict."""

    @classmethod
    def _default_args(cls) -> TrainingArguments:
        from ..args.seq2seq import Seq2SeqTrainingArguments

        return Seq2SeqTrainingArguments()  # Trainer's default, with the seq2seq fields

    def _finish_init(self) -> None:
        self._check_seq2seq_inputs()
        self._gen_kwargs: dict[str, Any] = self._resolve_gen_kwargs({})
        self._apply_generation_config(self.model)

    # -- arguments ------------------------------------------------------------------------------------
    def _seq2seq_arg(self, name: str, default: Any = None) -> Any:
        # A plain TrainingArguments runs like Trainer: no generation, no sortish sampler.
        return getattr(self.args, name, default)

    def _check_seq2seq_inputs(self) -> None:
        dataset = self.train_dataset
        if (
            self._seq2seq_arg("sortish_sampler", False)
            and dataset is not None
            and is_iterable_dataset(dataset)
        ):
            raise ValueError(
                "`sortish_sampler=True` sorts the training set by length, which a streamed "
                "(iterable) dataset cannot be; pass a map-style dataset or set sortish_sampler=False."
            )

    def _apply_generation_config(self, model: nn.Module) -> None:
        value = self._seq2seq_arg("generation_config")
        if value is not None:
            self.strategy.unwrap(model).generation_config = self.load_generation_config(value)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        # With model_init, train() builds a fresh model: it gets the configured generation too.
        model = super().call_model_init(trial)
        if hasattr(self, "_gen_kwargs"):  # after __init__; __init__ applies it itself
            self._apply_generation_config(model)
        return model

    @staticmethod
    def load_generation_config(gen_config_arg: Any) -> Any:
        """A `GenerationConfig` from `Seq2SeqTrainingArguments.generation_config`: a GenerationConfig
        (copied), a dict of its fields, a folder or file written by `save_pretrained`, or a model name.
        Checked strictly, as transformers does, so a bad setting fails before any work."""
        from transformers import GenerationConfig

        if isinstance(gen_config_arg, GenerationConfig):
            config = copy.deepcopy(gen_config_arg)
        elif isinstance(gen_config_arg, dict):
            config = GenerationConfig(**gen_config_arg)
        else:
            path = Path(gen_config_arg)
            try:
                if path.is_file():
                    config = GenerationConfig.from_pretrained(path.parent, path.name)
                else:
                    config = GenerationConfig.from_pretrained(str(gen_config_arg))
            except OSError as err:
                raise ValueError(
                    f"`generation_config`={str(gen_config_arg)!r}: no generation config could be loaded "
                    f"({err}). Pass a folder holding generation_config.json (as GenerationConfig."
                    "save_pretrained writes), a dict of its fields, or a GenerationConfig."
                ) from None
        try:
            config.validate(strict=True)
        except ValueError as err:
            raise ValueError(f"`generation_config` is not valid: {err}") from None
        return config

    def _resolve_gen_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """`gen_kwargs` over the arguments' generation_max_length / generation_num_beams."""
        resolved = dict(gen_kwargs)
        max_length = self._seq2seq_arg("generation_max_length")
        unlimited = resolved.get("max_length") is None and resolved.get("max_new_tokens") is None
        if unlimited and max_length is not None:
            resolved["max_length"] = max_length
        num_beams = self._seq2seq_arg("generation_num_beams")
        if resolved.get("num_beams") is None and num_beams is not None:
            resolved["num_beams"] = num_beams
        return resolved

    def _make_train_batch_sampler(self, dataset: Any) -> Any:
        if not self._seq2seq_arg("sortish_sampler", False):
            return super()._make_train_batch_sampler(dataset)
        from ..args.accelerator_config import accelerator_config_of
        from ..data.loaders import dataset_lengths, resolve_data_seed
        from ..data.sortish import SortishBatchSampler

        config = accelerator_config_of(self.args)
        return SortishBatchSampler(
            len(dataset),
            self._rank_batch_size(),
            dataset_lengths(dataset, self.args.length_column_name),
            drop_last=self.args.dataloader_drop_last,
            seed=resolve_data_seed(self.args),
            rank=self.strategy.dp_rank,
            world_size=self.strategy.dp_world_size,
            even_batches=config.even_batches,
            seedable=config.use_seedable_sampler,
        )

    def get_train_dataloader(self) -> Any:
        self._check_seq2seq_inputs()  # train_dataset may have been replaced since __init__
        return super().get_train_dataloader()

    # -- evaluate and predict ------------------------------------------------------------------------
    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        **gen_kwargs: Any,
    ) -> dict[str, float]:
        """As `Trainer.evaluate`; `gen_kwargs` (max_length, max_new_tokens, num_beams, any `generate`
        keyword) win over generation_max_length / generation_num_beams for this call."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            # Each named set under the same generation settings (not only the first).
            metrics: dict[str, float] = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}", **gen_kwargs))
            return metrics
        with self._generation_settings(gen_kwargs):
            return super().evaluate(
                eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )

    def predict(
        self,
        test_dataset: Any,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "test",
        **gen_kwargs: Any,
    ) -> PredictionOutput:
        """As `Trainer.predict`; with predict_with_generate the predictions are generated token ids."""
        with self._generation_settings(gen_kwargs):
            return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    @contextlib.contextmanager
    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> Iterator[None]:
        """The call's generation keywords, for every prediction_step of this evaluate/predict.

        They stay set afterwards, as in transformers, where a later prediction_step called
        directly generates with the last call's settings."""
        self._gen_kwargs = self._resolve_gen_kwargs(gen_kwargs)
        if self._seq2seq_arg("predict_with_generate", False):
            self._pad_token_id()  # no pad token is an error before any batch runs
        yield

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs: Any,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """(loss, generated ids, labels) of one batch with predict_with_generate, else as Trainer's."""
        if not self._seq2seq_arg("predict_with_generate", False) or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        has_labels = "labels" in inputs
        inputs = self._prepare_inputs(inputs)
        kwargs = dict(gen_kwargs) if gen_kwargs else dict(self._gen_kwargs)
        for key in ("num_beams", "max_length"):
            if key in kwargs and kwargs[key] is None:
                del kwargs[key]
        kwargs.setdefault("synced_gpus", self.strategy.shards_parameters)
        generator: Any = self.strategy.unwrap(model)  # a transformers model (GenerationMixin)
        generation_inputs = _generation_inputs(inputs)
        loss = None
        if has_labels:
            with torch.no_grad(), self.precision.autocast():
                loss, outputs = self.compute_loss(model, dict(inputs), return_outputs=True)
            loss = loss.mean().detach()
            # The loss's forward already ran the encoder on this batch: generate reuses its output
            # instead of running it again (same module, inputs and precision: the same numbers).
            encoded = _reusable_encoder_outputs(generator, outputs, generation_inputs, kwargs)
            if encoded is not None:
                generation_inputs["encoder_outputs"] = encoded
            del outputs  # the logits: not needed, and batch x length x vocab large
        sharded = self.strategy.shards_parameters
        with torch.no_grad(), self.precision.autocast(), _full_parameters(generator, sharded):
            generated = generator.generate(**generation_inputs, **kwargs)
        config = generator.generation_config
        # As transformers: a config derived from the model's config is not derived again each batch.
        if getattr(config, "_from_model_config", False):
            config._from_model_config = False
        if self.args.prediction_loss_only:
            return loss, None, None
        labels = inputs["labels"] if has_labels else None
        if labels is not None:
            labels = self._pad_tensors_to_max_len(labels, _padded_length(labels, config))
        return loss, self._pad_tensors_to_max_len(generated, _padded_length(generated, config)), labels

    # -- padding -------------------------------------------------------------------------------------
    def _pad_token_id(self) -> int:
        """The id generated ids and labels are padded with: the tokenizer's pad token (its EOS if it
        has none), else the model config's pad_token_id."""
        tokenizer = self.processing_class
        if tokenizer is not None and hasattr(tokenizer, "pad_token_id"):
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad is not None:
                return int(pad)
        config = getattr(self.strategy.unwrap(self.model), "config", None)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            raise ValueError(
                "predict_with_generate pads generated ids and labels with the pad token, but neither the "
                "processing_class (pad_token_id or eos_token_id) nor model.config.pad_token_id names one; "
                "set model.config.pad_token_id or pass the tokenizer as processing_class."
            )
        return int(pad)

    def _pad_tensors_to_max_len(self, tensor: torch.Tensor, max_length: int) -> torch.Tensor:
        """`tensor` right-padded with the pad token to `max_length` columns (unchanged if as long)."""
        if tensor.shape[-1] >= max_length:
            return tensor
        padded = tensor.new_full((tensor.shape[0], max_length), self._pad_token_id())
        padded[:, : tensor.shape[-1]] = tensor
        return padded


def _padded_length(tensor: torch.Tensor, config: Any) -> int:
    """The width transformers pads a batch of ids to: the model's generation config's max_length
    (its default when unset) if shorter, else max_new_tokens + 1 (the decoder start token comes
    first) if shorter than that, else as it is."""
    width = int(tensor.shape[-1])
    max_length = getattr(config, "max_length", None)
    if max_length is None:
        max_length = _DEFAULT_MAX_LENGTH
    if width < max_length:
        return int(max_length)
    max_new = getattr(config, "max_new_tokens", None)
    if max_new is not None and width < max_new + 1:
        return int(max_new) + 1
    return width


def _generation_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch for `generate`. Decoder inputs a collator built from the labels (same shape) would
    make generation continue the reference instead of starting fresh, so they are left out."""
    labels, decoder_ids = inputs.get("labels"), inputs.get("decoder_input_ids")
    if (
        isinstance(labels, torch.Tensor)
        and isinstance(decoder_ids, torch.Tensor)
        and labels.shape == decoder_ids.shape
    ):
        return {k: v for k, v in inputs.items() if k not in ("decoder_input_ids", "decoder_attention_mask")}
    return dict(inputs)


def _reusable_encoder_outputs(
    generator: Any, outputs: Any, generation_inputs: dict[str, Any], gen_kwargs: dict[str, Any]
) -> Any:
    """The encoder output of the loss's forward, in the form `generate(encoder_outputs=...)` takes,
    where generate would compute exactly that itself: an encoder-decoder model with transformers'
    own `generate`, asked for no attentions or hidden states. None otherwise (generate encodes)."""
    from transformers import GenerationMixin
    from transformers.modeling_outputs import BaseModelOutput

    config = getattr(generator, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    if getattr(type(generator), "generate", None) is not GenerationMixin.generate:
        return None  # a model or wrapper (Whisper, PEFT) with its own generate
    hidden = getattr(outputs, "encoder_last_hidden_state", None) if not isinstance(outputs, tuple) else None
    if not isinstance(hidden, torch.Tensor) or "input_ids" not in generation_inputs:
        return None
    if any(k in generation_inputs for k in ("encoder_outputs", "inputs_embeds")):
        return None
    generation_config = getattr(generator, "generation_config", None)
    for flag in ("output_attentions", "output_hidden_states", "return_dict_in_generate"):
        if gen_kwargs.get(flag, getattr(generation_config, flag, False)):
            return None
    return BaseModelOutput(last_hidden_state=hidden)


@contextlib.contextmanager
def _full_parameters(model: nn.Module, sharded: bool) -> Iterator[None]:
    """FSDP2 gathers a block's parameters when that block runs; `generate` also calls parts of the
    model outside the root's forward (the encoder, the embeddings), so the root's own parameters are
    gathered for the whole call. The identity on other models (ZeRO-3 gathers per submodule)."""
    if sharded:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            model.unshard()
            try:
                yield
            finally:
                model.reshard()
            return
    yield
