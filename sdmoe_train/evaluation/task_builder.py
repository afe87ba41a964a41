"""Offline lm-eval tasks built from a corpus's held-out documents: two multiple-choice tasks and perplexity.

``sdmoe-train build-eval-tasks`` writes lm-evaluation-harness task definitions (YAML) with their data (jsonl)
from the validation documents of a recipe's ``data.corpus`` (:func:`~sdmoe_train.data.held_out.split_texts`),
text the model never trained on:

- ``<name>_last_word`` (``multiple_choice``, ``acc``/``acc_norm``): the last word of a line, after the rest
  of the line and up to ``context_lines - 1`` lines before it, among four words (local fluency);
- ``<name>_next_line`` (``multiple_choice``, ``acc``/``acc_norm``): the line that follows up to
  ``context_lines`` lines of a paragraph, among four lines (coherence across lines);
- ``<name>_perplexity`` (``loglikelihood_rolling``, ``word_perplexity``, ``byte_perplexity``,
  ``bits_per_byte``): the held-out documents cut at blank lines into pieces of at most ``perplexity_chars``
  characters, each scored over rolling windows of the model's context.

How items and their look-alike distractors are chosen: :mod:`~sdmoe_train.evaluation.choice_items`. Each
multiple-choice task also gets a ``fewshot`` split, disjoint from ``test``, for ``--num_fewshot``. All three
carry the tag ``<name>``, so ``--tasks <name>`` runs them together. The data files are read by
``jsonl_data.py`` next to the YAML files (an lm-eval ``custom_dataset``), which resolves them relative to
itself: the tasks work from any working directory.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sdmoe_train.data.held_out import SplitTexts
from sdmoe_train.errors import ConfigError
from sdmoe_train.evaluation.choice_items import (
    ItemRules,
    hash64,
    last_word_items,
    next_line_items,
    normal,
    paragraph_lines,
    split_paragraphs,
    word_counts,
)
from sdmoe_train.io import write_text_atomically

DATA_LOADER_MODULE = "jsonl_data"
_TASK_NAME = re.compile(r"[a-z][a-z0-9_]*")

_DATA_LOADER_SOURCE = '''\
"""Loads the jsonl files of the task YAML files in this directory, relative to this file (any working directory).

Written by `sdmoe-train build-eval-tasks`; lm-eval calls it as the tasks' `custom_dataset`.
"""

from pathlib import Path

import datasets


def load_splits(data_files: dict, **_task_metadata):
    here = Path(__file__).resolve().parent
    return datasets.load_dataset("json", data_files={split: str(here / name) for split, name in data_files.items()})
'''


@dataclass(kw_only=True)
class TaskBuildConfig:
    """What ``build-eval-tasks`` writes: task names, item counts and the rules that pick them."""

    name: str = "shakespeare"
    """Tag of the tasks and prefix of their names: ``<name>_last_word``, ``_next_line``, ``_perplexity``."""
    seed: int = 1234
    """Key of every choice (items, distractors, answer positions)."""
    last_word_items: int = 400
    """Last-word items in the ``test`` split."""
    next_line_items: int = 400
    """Next-line items in the ``test`` split."""
    fewshot_items: int = 32
    """Items in each multiple-choice task's ``fewshot`` split (examples for ``--num_fewshot``)."""
    context_lines: int = 4
    """Most lines of context (all from the answer's paragraph; for last-word items, with the answer's line)."""
    min_context_lines: int = 2
    """Fewest lines of context of a next-line item."""
    min_words: int = 4
    """Answer lines (and next-line distractors) have at least this many words."""
    length_tolerance: float = 0.15
    """Next-line distractors' lengths differ from the answer's by at most this share of it."""
    perplexity_chars: int = 4000
    """Longest perplexity document, in characters (held-out documents are cut at blank lines)."""
    perplexity_docs: int | None = None
    """Keep only this many perplexity documents (the first ones); None keeps all."""

    def __post_init__(self) -> None:
        if not _TASK_NAME.fullmatch(self.name):
            raise ConfigError(f"--name={self.name!r} must be lower-case letters, digits and '_' (a task name prefix)")
        for field in ("context_lines", "min_context_lines", "min_words", "perplexity_chars"):
            if getattr(self, field) < 1:
                raise ConfigError(f"--{field}={getattr(self, field)} must be >= 1")
        for field in ("last_word_items", "next_line_items", "fewshot_items"):
            if getattr(self, field) < 0:
                raise ConfigError(f"--{field}={getattr(self, field)} must be >= 0 (0 leaves the task out)")
        if self.min_context_lines > self.context_lines:
            raise ConfigError(
                f"--min_context_lines={self.min_context_lines} must not exceed --context_lines={self.context_lines}"
            )
        if not 0.0 < self.length_tolerance < 1.0:
            raise ConfigError(f"--length_tolerance={self.length_tolerance} must lie in (0, 1)")
        if self.perplexity_docs is not None and self.perplexity_docs < 1:
            raise ConfigError(f"--perplexity_docs={self.perplexity_docs} must be >= 1 (or null for all)")

    def task(self, kind: str) -> str:
        """The name of one of the tasks: ``last_word``, ``next_line`` or ``perplexity``."""
        return f"{self.name}_{kind}"


@dataclass(frozen=True)
class ChoiceTaskSummary:
    """What was written for one multiple-choice task."""

    task: str
    test_items: int
    fewshot_items: int
    dropped_as_trained: int
    """Candidate items dropped because their answer line occurs in a training document."""


@dataclass(frozen=True)
class BuiltTasks:
    """What :func:`build_tasks` wrote."""

    files: list[Path]
    """Every file written, YAML and data."""
    choice_tasks: list[ChoiceTaskSummary]
    """The multiple-choice tasks (those with items requested)."""
    perplexity_docs: int
    """Perplexity documents."""
    perplexity_chars: int
    """Characters in all perplexity documents."""


def build_tasks(texts: SplitTexts, config: TaskBuildConfig, out_dir: str | Path) -> BuiltTasks:
    """Writes the task YAML files, their jsonl data and the data loader into ``out_dir``.

    Args:
        texts: The corpus split as training splits it.
        config: Item counts, names and selection rules.
        out_dir: Directory to create or update (each file is replaced atomically).

    Returns:
        A summary of what was written.

    Raises:
        ConfigError: If the held-out text is empty or too small for the requested item counts.
    """
    if not any(text.strip() for text in texts.validation):
        raise ConfigError(
            "the recipe's validation split is empty; set data.corpus.val_fraction > 0 (or streaming_val_docs > 0)"
        )
    paragraphs = paragraph_lines(texts.validation)
    trained_lines = {normal(line) for text in texts.train for line in text.splitlines()}
    rules = ItemRules(
        seed=config.seed,
        context_lines=config.context_lines,
        min_context_lines=config.min_context_lines,
        min_words=config.min_words,
        length_tolerance=config.length_tolerance,
    )
    makers: dict[str, tuple[int, Callable[[], tuple[list[dict], int]]]] = {
        "last_word": (
            config.last_word_items,
            lambda: last_word_items(paragraphs, trained_lines, word_counts(texts.train), rules),
        ),
        "next_line": (config.next_line_items, lambda: next_line_items(paragraphs, trained_lines, rules)),
    }
    files: dict[str, str] = {}
    summaries = []
    for kind, (count, make) in makers.items():
        if count == 0:
            continue
        task = config.task(kind)
        items, dropped = make()
        test, fewshot = _sample(items, count, config.fewshot_items, config.seed, task, dropped)
        files[f"{task}_test.jsonl"] = _jsonl(test)
        files[f"{task}_fewshot.jsonl"] = _jsonl(fewshot)
        files[f"{task}.yaml"] = _choice_yaml(config, task, "\\n" if kind == "next_line" else " ")
        summaries.append(ChoiceTaskSummary(task, len(test), len(fewshot), dropped))
    documents = list(_perplexity_documents(texts.validation, config.perplexity_chars))[: config.perplexity_docs]
    files[f"{config.task('perplexity')}_test.jsonl"] = _jsonl(documents)
    files[f"{config.task('perplexity')}.yaml"] = _perplexity_yaml(config)
    files[f"{DATA_LOADER_MODULE}.py"] = _DATA_LOADER_SOURCE
    out = Path(out_dir)
    for name, content in files.items():
        write_text_atomically(out / name, content)
    return BuiltTasks(
        files=[out / name for name in files],
        choice_tasks=summaries,
        perplexity_docs=len(documents),
        perplexity_chars=sum(len(document["text"]) for document in documents),
    )


def _sample(
    items: list[dict], count: int, fewshot: int, seed: int, task: str, dropped: int
) -> tuple[list[dict], list[dict]]:
    """``count`` test and ``fewshot`` few-shot items (disjoint), each in document order."""
    if len(items) < count + fewshot:
        raise ConfigError(
            f"the held-out text yields {len(items)} {task} items ({dropped} more were dropped because their answer "
            f"occurs in training text), fewer than the {count} + {fewshot} (few-shot) requested; lower the item "
            "counts, or hold out more documents (data.corpus.val_fraction)"
        )
    chosen = sorted(items, key=lambda item: hash64(seed, "sample", task, item["id"]))[: count + fewshot]
    return sorted(chosen[fewshot:], key=_position), sorted(chosen[:fewshot], key=_position)


def _perplexity_documents(documents: list[str], max_chars: int) -> Iterator[dict]:
    """Held-out documents cut at blank lines into pieces of at most ``max_chars`` (longer paragraphs stay whole)."""
    for document_index, document in enumerate(documents):
        piece: list[str] = []
        part = 0
        for paragraph in split_paragraphs([document]):
            if piece and len("\n\n".join([*piece, paragraph])) > max_chars:
                yield {"id": f"d{document_index}p{part}", "text": "\n\n".join(piece)}
                piece, part = [], part + 1
            piece.append(paragraph)
        if piece:
            yield {"id": f"d{document_index}p{part}", "text": "\n\n".join(piece)}


def _position(item: dict) -> tuple[int, int]:
    document, line = item["id"][1:].split("l")
    return int(document), int(line)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _header(config: TaskBuildConfig) -> str:
    options = " ".join(f"--{field.name} {getattr(config, field.name)}" for field in dataclasses.fields(config))
    return (
        "# Written by `sdmoe-train build-eval-tasks` from the held-out documents of a recipe's data.corpus;\n"
        f"# do not edit by hand. Options: {options}\n"
    )


def _choice_yaml(config: TaskBuildConfig, task: str, delimiter: str) -> str:
    return f"""{_header(config)}task: {task}
tag: [{config.name}]
custom_dataset: !function {DATA_LOADER_MODULE}.load_splits
dataset_kwargs:
  data_files: {{test: {task}_test.jsonl, fewshot: {task}_fewshot.jsonl}}
output_type: multiple_choice
test_split: test
fewshot_split: fewshot
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: "{delimiter}"
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _perplexity_yaml(config: TaskBuildConfig) -> str:
    task = config.task("perplexity")
    return f"""{_header(config)}task: {task}
tag: [{config.name}]
custom_dataset: !function {DATA_LOADER_MODULE}.load_splits
dataset_kwargs:
  data_files: {{test: {task}_test.jsonl}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""
