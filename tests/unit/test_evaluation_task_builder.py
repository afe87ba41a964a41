"""Offline evaluation tasks: built only from held-out text, with plausible distractors, reproducibly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sdmoe_train.data.cache import build_token_cache
from sdmoe_train.data.config import DataConfig
from sdmoe_train.data.held_out import SplitTexts, split_texts
from sdmoe_train.data.tokenizer import encode_documents, eos_token_id, load_tokenizer
from sdmoe_train.errors import ConfigError
from sdmoe_train.evaluation.choice_items import word_counts
from sdmoe_train.evaluation.task_builder import TaskBuildConfig, build_tasks
from tests.corpora import make_config

ENDINGS = ["crown", "night", "sword", "queen", "storm", "ghost", "death", "fool", "love", "king", "sea", "sun"]


def _verse(index: int, lines: int) -> str:
    """A document of speeches (paragraphs), each a speaker line and numbered verse lines of varied length,
    ending in varied words."""
    speeches = []
    for speech in range(lines // 4):
        body = [
            f"Line {index}-{speech}-{row} of verse{' and more words' * ((index + row) % 3)} "
            f"{ENDINGS[(5 * index + 3 * speech + row) % len(ENDINGS)]},"
            for row in range(4)
        ]
        speeches.append("\n".join([f"SPEAKER {speech % 3}.", *body]))
    return "\n\n".join(speeches)


def _texts() -> SplitTexts:
    return SplitTexts(validation=[_verse(0, 40), _verse(1, 40)], train=[_verse(2, 40), "Line 0-0-3 of verse queen,"])


def _items(directory: Path, task: str = "tiny_next_line", split: str = "test") -> list[dict]:
    return [json.loads(line) for line in (directory / f"{task}_{split}.jsonl").read_text().splitlines()]


def _config(**settings: object) -> TaskBuildConfig:
    defaults = {"name": "tiny", "last_word_items": 20, "next_line_items": 20, "fewshot_items": 4}
    return TaskBuildConfig(**{**defaults, "length_tolerance": 0.3, **settings})


def test_next_line_items_ask_for_the_true_next_line_among_look_alike_lines(tmp_path: Path) -> None:
    texts = _texts()
    built = build_tasks(texts, _config(), tmp_path)
    (summary,) = [summary for summary in built.choice_tasks if summary.task == "tiny_next_line"]
    assert (summary.test_items, summary.fewshot_items) == (20, 4)
    validation_lines = [text.split("\n") for text in texts.validation]
    for item in _items(tmp_path):
        choices, answer = item["choices"], item["choices"][item["label"]]
        assert len(set(choices)) == 4
        document, line = map(int, item["id"][1:].split("l"))
        lines = validation_lines[document]
        assert lines[line - 1] == answer  # the real next line of a held-out document ...
        window = lines[max(0, line - 5) : line - 1]  # up to 4 lines before it, within its paragraph
        assert item["context"] == "\n".join(window[len(window) - window[::-1].index("") :] if "" in window else window)
        for distractor in set(choices) - {answer}:
            assert distractor not in item["context"]  # ... and distractors from other paragraphs
            assert distractor[0].isupper() == answer[0].isupper() and distractor[-1] == answer[-1]
            assert abs(len(distractor) - len(answer)) <= 0.3 * len(answer)
    assert "Line 0-0-3 of verse queen," not in {item["choices"][item["label"]] for item in _items(tmp_path)}
    assert summary.dropped_as_trained >= 1
    labels = [item["label"] for item in _items(tmp_path)]
    assert len(set(labels)) == 4  # the answer is not always in the same slot


def test_last_word_items_ask_for_the_true_last_word_among_look_alike_words(tmp_path: Path) -> None:
    texts = _texts()
    built = build_tasks(texts, _config(), tmp_path)
    (summary,) = [summary for summary in built.choice_tasks if summary.task == "tiny_last_word"]
    assert summary.dropped_as_trained >= 1  # "Line 0-0-3 of verse queen," is in a training document
    counts = word_counts(texts.train)
    for item in _items(tmp_path, "tiny_last_word"):
        choices, answer = item["choices"], item["choices"][item["label"]]
        assert len({choice.casefold() for choice in choices}) == 4
        document, line = map(int, item["id"][1:].split("l"))
        true_line = texts.validation[document].split("\n")[line - 1]
        assert true_line.startswith(item["context"].split("\n")[-1] + " " + answer)  # the line's own last word
        for distractor in set(choices) - {answer}:
            assert distractor.casefold() not in item["context"].casefold().split()
            assert abs(len(distractor) - len(answer)) <= 2
            frequency_class = int(math.log2(1 + counts[distractor.lower()]))
            assert frequency_class == int(math.log2(1 + counts[answer.lower()]))


def test_the_build_is_deterministic_and_the_seed_changes_it(tmp_path: Path) -> None:
    config = _config()
    for directory in ("a", "b"):
        build_tasks(_texts(), config, tmp_path / directory)
    for file in (tmp_path / "a").iterdir():
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes(), file.name
    config.seed = 7
    build_tasks(_texts(), config, tmp_path / "c")
    assert _items(tmp_path / "c") != _items(tmp_path / "a")


def test_fewshot_examples_are_never_test_items(tmp_path: Path) -> None:
    build_tasks(_texts(), _config(fewshot_items=6), tmp_path)
    for task in ("tiny_next_line", "tiny_last_word"):
        fewshot = {item["id"] for item in _items(tmp_path, task, "fewshot")}
        assert len(fewshot) == 6 and not fewshot & {item["id"] for item in _items(tmp_path, task)}


def test_perplexity_documents_cover_the_held_out_text_in_pieces(tmp_path: Path) -> None:
    texts = _texts()
    build_tasks(texts, _config(perplexity_chars=300), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "tiny_perplexity_test.jsonl").read_text().splitlines()]
    assert all(len(row["text"]) <= 300 for row in rows)
    assert "\n\n".join(row["text"] for row in rows) == "\n\n".join(texts.validation)


def test_too_little_held_out_text_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="yields .* tiny_next_line items .* fewer than the 10000 \\+ 4"):
        build_tasks(_texts(), _config(next_line_items=10_000), tmp_path)
    with pytest.raises(ConfigError, match="validation split is empty"):
        build_tasks(SplitTexts(validation=[], train=["x"]), TaskBuildConfig(), tmp_path)
    with pytest.raises(ConfigError, match="--name"):
        TaskBuildConfig(name="Bad Name")


@pytest.mark.parametrize("streaming", [False, True], ids=["token_cache", "streaming"])
def test_held_out_texts_are_exactly_the_validation_split_training_reads(
    tmp_path: Path, corpus: tuple, streaming: bool
) -> None:
    documents, pattern, tokenizer_path, _ = corpus
    config = make_config(tmp_path, pattern, tokenizer_path, streaming=streaming, streaming_val_docs=3)
    texts = split_texts(config)
    assert sorted(texts.validation + texts.train) == sorted(documents)
    assert not set(texts.validation) & set(texts.train)
    if streaming:
        assert texts.validation == documents[:3]
        return
    tokenizer = load_tokenizer(tokenizer_path)
    cache = build_token_cache(config, tokenizer)
    encoded = encode_documents(tokenizer, texts.validation, eos_token_id(tokenizer))
    np.testing.assert_array_equal(np.concatenate([np.asarray(ids) for ids in encoded]), cache.val_tokens)


SHIPPED = Path(__file__).resolve().parents[2] / "eval_tasks" / "shakespeare"


@pytest.mark.slow
def test_the_shipped_tasks_are_what_build_eval_tasks_writes_from_the_demo_recipe(tmp_path: Path) -> None:
    from sdmoe_train.data.demo_corpus import install_demo_corpus

    install_demo_corpus(tmp_path / "plays")
    recipe = DataConfig(data_files=[str(tmp_path / "plays" / "*.txt")], val_fraction=0.05, shuffle_seed=1234)
    build_tasks(split_texts(recipe), TaskBuildConfig(), tmp_path / "built")
    shipped = sorted(path.name for path in SHIPPED.iterdir() if path.name != "__pycache__")
    assert shipped == sorted(path.name for path in (tmp_path / "built").iterdir())
    for name in shipped:
        assert (SHIPPED / name).read_bytes() == (tmp_path / "built" / name).read_bytes(), name
