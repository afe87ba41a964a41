"""Multiple-choice items from held-out text: the true next line, or the true last word of a line, among four.

Distractors must not give the answer away by anything but its fit to the context. They come from *other*
paragraphs of the held-out text (a paragraph is a block between blank lines: one speech of a play) and look
like the answer:

- next line: the same kind of first character (capital, lower case, other), the same last character (a
  letter, or the very punctuation mark) and a length within a set share of the answer's;
- last word: the same capitalisation, a length within two letters, and the same frequency class in the
  training text (``floor(log2(1 + count))``), so a model cannot win by preferring frequent words.

No distractor repeats the answer or occurs in the context, and items whose answer line also occurs in a
training document are dropped. Every choice is a keyed hash of the seed and the item (:func:`hash64`), not a
random-number generator, so the items are the same on every platform and Python or NumPy version.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NUM_CHOICES = 4
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_LAST_WORD = re.compile(r"^(?P<head>.*\S)\s+(?P<word>[A-Za-z][A-Za-z']*[A-Za-z])[^A-Za-z0-9]*$")
_WORD = re.compile(r"[A-Za-z][A-Za-z']*[A-Za-z]|[A-Za-z]")
_MASK64 = (1 << 64) - 1
_WORD_LENGTH_SLACK = 2


@dataclass(frozen=True)
class Line:
    """One non-empty, stripped line of a held-out document."""

    text: str
    document: int
    """Index of the document among the held-out ones."""
    paragraph: int
    """Index of its paragraph in the whole held-out text (distractors come from other paragraphs)."""
    line: int
    """Line number inside its document (1-based)."""


def split_paragraphs(documents: list[str]) -> Iterator[str]:
    """The non-empty paragraphs (blocks between blank lines) of the documents, in order."""
    for document in documents:
        for block in _PARAGRAPH_BREAK.split(document):
            if block.strip():
                yield block.strip("\n")


def paragraph_lines(documents: list[str]) -> list[list[Line]]:
    """Every paragraph of the documents as its lines, numbered as in the documents."""
    paragraphs: list[list[Line]] = []
    for document_index, document in enumerate(documents):
        line_number = 1
        for block in _PARAGRAPH_BREAK.split(document):
            lines = [
                Line(text.strip(), document_index, len(paragraphs), line_number + offset)
                for offset, text in enumerate(block.split("\n"))
                if text.strip()
            ]
            line_number += block.count("\n") + 2  # a paragraph break holds two line ends
            if lines:
                paragraphs.append(lines)
    return paragraphs


def normal(text: str) -> str:
    """Whitespace-collapsed, case-folded text: lines that differ only in spacing or case count as equal."""
    return " ".join(text.split()).casefold()


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each (lower-cased) word occurs in the texts."""
    return Counter(word.lower() for text in texts for word in _WORD.findall(text))


@dataclass(frozen=True)
class ItemRules:
    """How items are cut from paragraphs and how alike their distractors must be."""

    seed: int
    context_lines: int
    min_context_lines: int
    min_words: int
    length_tolerance: float


def next_line_items(paragraphs: list[list[Line]], trained_lines: set[str], rules: ItemRules) -> tuple[list[dict], int]:
    """Items ``{"id", "context", "choices", "label"}`` asking for the line after 1..context_lines lines.

    Returns:
        The items, and how many candidates were dropped because their answer occurs in training text.
    """
    candidates = [line for lines in paragraphs for line in lines if len(line.text.split()) >= rules.min_words]
    pool = _Pool(((_line_shape(line.text), len(line.text), line.text, line.paragraph) for line in candidates), rules)
    items, dropped = [], 0
    for lines in paragraphs:
        for position in range(rules.min_context_lines, len(lines)):
            answer = lines[position]
            if len(answer.text.split()) < rules.min_words:
                continue
            if normal(answer.text) in trained_lines:
                dropped += 1
                continue
            context = lines[max(0, position - rules.context_lines) : position]
            item_id = f"d{answer.document}l{answer.line}"
            length = len(answer.text)
            distractors = pool.pick(
                _line_shape(answer.text),
                (length * (1 - rules.length_tolerance), length * (1 + rules.length_tolerance)),
                answer.paragraph,
                {normal(line.text) for line in context} | {normal(answer.text)},
                item_id,
            )
            if distractors is not None:
                items.append(_item(item_id, "\n".join(line.text for line in context), answer.text, distractors, rules))
    return items, dropped


def last_word_items(
    paragraphs: list[list[Line]], trained_lines: set[str], counts: Counter[str], rules: ItemRules
) -> tuple[list[dict], int]:
    """Items asking for the last word of a line after the rest of it and up to context_lines lines before.

    Args:
        paragraphs: from :func:`paragraph_lines`.
        trained_lines: :func:`normal` forms of every training line (their items are dropped).
        counts: word counts of the training text, for the frequency classes.
        rules: context size, minimum words, seed.

    Returns:
        The items (``context`` ends before the word; choices are bare words), and the dropped count.
    """
    endings = [(line, match) for lines in paragraphs for line in lines if (match := _LAST_WORD.match(line.text))]
    pool = _Pool(
        (
            (_word_shape(match["word"], counts), len(match["word"]), match["word"], line.paragraph)
            for line, match in endings
        ),
        rules,
    )
    items, dropped = [], 0
    for lines in paragraphs:
        for position, answer in enumerate(lines):
            match = _LAST_WORD.match(answer.text)
            if match is None or len(answer.text.split()) < rules.min_words:
                continue
            if normal(answer.text) in trained_lines:
                dropped += 1
                continue
            context_lines = [line.text for line in lines[max(0, position - rules.context_lines + 1) : position]]
            context = "\n".join([*context_lines, match["head"]])
            word, item_id = match["word"], f"d{answer.document}l{answer.line}"
            excluded = {token.casefold() for token in _WORD.findall(context)} | {word.casefold()}
            distractors = pool.pick(
                _word_shape(word, counts),
                (len(word) - _WORD_LENGTH_SLACK, len(word) + _WORD_LENGTH_SLACK),
                answer.paragraph,
                excluded,
                item_id,
            )
            if distractors is not None:
                items.append(_item(item_id, context, word, distractors, rules))
    return items, dropped


def _item(item_id: str, context: str, answer: str, distractors: list[str], rules: ItemRules) -> dict:
    slot = hash64(rules.seed, "slot", item_id) % NUM_CHOICES
    return {
        "id": item_id,
        "context": context,
        "choices": [*distractors[:slot], answer, *distractors[slot:]],
        "label": slot,
    }


class _Pool:
    """Distractor candidates grouped by shape and sorted by size, picked per item by a keyed hash rank."""

    def __init__(self, entries: Iterable[tuple[tuple, int, str, int]], rules: ItemRules) -> None:
        self._seed = rules.seed
        self._groups: dict[tuple, list[tuple[int, str, str, int, int]]] = {}
        for shape, size, text, paragraph in entries:
            key = normal(text)
            self._groups.setdefault(shape, []).append((size, key, text, paragraph, hash64(self._seed, "entry", key)))
        for group in self._groups.values():
            group.sort()
        self._sizes = {shape: [entry[0] for entry in group] for shape, group in self._groups.items()}

    def pick(
        self, shape: tuple, sizes: tuple[float, float], paragraph: int, excluded: set[str], item_id: str
    ) -> list[str] | None:
        """Three distinct texts of this shape and size range from other paragraphs; None if there are fewer."""
        group, group_sizes = self._groups.get(shape, []), self._sizes.get(shape, [])
        low, high = bisect.bisect_left(group_sizes, sizes[0]), bisect.bisect_right(group_sizes, sizes[1])
        item_hash = hash64(self._seed, "item", item_id)
        # One keyed rank per (item, candidate): a candidate's rank differs from item to item, so every
        # candidate is equally likely to be picked, without hashing every pair.
        ranked: dict[str, tuple[int, str]] = {}
        for _, key, text, candidate_paragraph, entry_hash in group[low:high]:
            if candidate_paragraph != paragraph and key not in excluded:
                ranked[key] = (_mix64(entry_hash ^ item_hash), text)
        if len(ranked) < NUM_CHOICES - 1:
            return None
        return [text for _, text in heapq.nsmallest(NUM_CHOICES - 1, ranked.values())]


def _line_shape(text: str) -> tuple[str, str]:
    first = "upper" if text[0].isupper() else "lower" if text[0].islower() else "other"
    return first, "letter" if text[-1].isalnum() else text[-1]


def _word_shape(word: str, counts: Counter[str]) -> tuple[str, int]:
    return ("upper" if word[0].isupper() else "lower"), int(math.log2(1 + counts[word.lower()]))


def hash64(seed: int, *parts: str) -> int:
    """A 64-bit key of ``parts`` under ``seed`` (BLAKE2: the same on every platform and Python version)."""
    digest = hashlib.blake2b("\x1f".join((str(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix64(value: int) -> int:
    """The splitmix64 finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)
