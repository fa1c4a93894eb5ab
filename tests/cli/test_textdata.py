"""Text builders, the cached BPE tokenizer and chunking behind `ember train`'s `data:` section."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.cli.textdata import TokenBlocks, build_texts, build_tokenizer, chunk_texts, play_text

pytest.importorskip("tokenizers")


def test_play_markdown_becomes_plain_text() -> None:
    markdown = "# Hamlet\n\n## ACT I\n\n_Enter Ghost_\n\n**BERNARDO**  \nWho's there?  \nStand\\-ho.\n"
    assert play_text(markdown) == "Hamlet\n\nACT I\n\nEnter Ghost\n\nBERNARDO:\nWho's there?\nStand-ho.\n"


def test_shakespeare_holds_out_the_eval_plays() -> None:
    splits = build_texts(
        {"shakespeare": {"eval_plays": ["macbeth"], "eval_max_chars": 500, "block_size": 16}}
    )
    assert splits.block_size == 16
    assert len(splits.eval) == 1 and splits.eval[0].startswith("Macbeth") and len(splits.eval[0]) == 500
    assert len(splits.train) > 30 and not any(t.startswith("Macbeth\n") for t in splits.train)
    assert "**" not in splits.train[0] and "\nHAMLET:\n" in "".join(splits.train)
    capped = build_texts({"shakespeare": {"max_chars": 1000}})
    assert sum(map(len, capped.train)) == 1000


def test_text_files_hold_out_the_tail(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    splits = build_texts({"text_files": {"paths": [str(tmp_path / "*.txt")], "eval_fraction": 0.1}})
    assert splits.train[0].endswith("line 89\n") and splits.eval[0].startswith("line 90\n")
    with pytest.raises(ValueError, match="match no file"):
        build_texts({"text_files": {"paths": [str(tmp_path / "*.md")]}})


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ({"shakespear": {}}, ["`shakespear`", "`shakespeare`"]),
        ({"shakespeare": {"eval_play": []}}, ["data.shakespeare", "`eval_play`", "`eval_plays`"]),
        ({"shakespeare": {"genres": ["tragedy"]}}, ["'tragedy'", "`tragedies`"]),
        ({"text_files": {}}, ["data.text_files", "paths"]),
        ({"shakespeare": {}, "text_files": {}}, ["exactly one builder"]),
    ],
)
def test_bad_data_sections_name_the_key(spec: dict[str, object], names: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        build_texts(spec)
    for name in names:
        assert name in str(info.value)


def test_bpe_tokenizer_is_trained_once_then_loaded_from_the_cache(tmp_path: Path) -> None:
    texts = ["To be, or not to be, that is the question.\n" * 20]
    spec = {"train": "byte_level_bpe", "vocab_size": 270, "cache_dir": str(tmp_path)}
    first = build_tokenizer(spec, {}, texts)
    (folder,) = tmp_path.iterdir()
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    again = build_tokenizer(spec, {}, texts)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp and list(tmp_path.iterdir()) == [folder]
    assert again("to be")["input_ids"] == first("to be")["input_ids"]
    assert again.decode(again("Who's there?")["input_ids"]) == "Who's there?"  # byte-level: lossless
    build_tokenizer({**spec, "vocab_size": 280}, {}, texts)
    assert len(list(tmp_path.iterdir())) == 2  # another vocabulary, another cache entry
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer({**spec, "vocab_size": 100}, {}, texts)


def test_chunks_join_documents_with_end_of_text_and_drop_the_remainder() -> None:
    tokenizer = build_tokenizer({"train": "byte_level_bpe", "vocab_size": 260}, {}, ["abc def\n"])
    blocks = chunk_texts(["abc", "def"], tokenizer, block_size=3)
    assert isinstance(blocks, TokenBlocks)
    eos = tokenizer.eos_token_id
    ids = tokenizer("abc", add_special_tokens=False)["input_ids"] + [eos]
    ids += tokenizer("def", add_special_tokens=False)["input_ids"] + [eos]
    assert blocks.blocks.flatten().tolist() == ids[: len(ids) // 3 * 3]
    item = blocks[0]
    assert item["labels"] is item["input_ids"] and item["input_ids"].shape == (3,)
    with pytest.raises(ValueError, match="block_size"):
        chunk_texts(["a"], tokenizer, block_size=64)
