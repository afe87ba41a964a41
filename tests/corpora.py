"""Small corpora and tokenizers shared by the data tests (this module holds no tests itself)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer

from sdmoe_train.data.config import DataConfig
from sdmoe_train.data.tokenizer import train_tokenizer

WORDS = ["the", "king", "queen", "sword", "crown", "night", "love", "death", "fool", "ghost", "storm", "sea"]
WORDS += ["speak", "hear", "come", "go", "never", "why", "thou", "thee", "thy", "doth", "hath", "is", "was"]


def fake_trainer(rank: int, world_size: int, training: bool = True, example: object = None) -> SimpleNamespace:
    """What the data module reads from Lightning's trainer: rank, world size, training flag, device."""
    return SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        training=training,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        lightning_module=SimpleNamespace(example_input_array=example),
    )


def make_documents(count: int = 12, seed: int = 0, min_words: int = 20, max_words: int = 90) -> list[str]:
    """Distinct pseudo-English documents; each starts with its index so it can be recognised."""
    rng = random.Random(seed)
    documents = []
    for index in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        lines = [" ".join(words[start : start + 9]) for start in range(0, len(words), 9)]
        documents.append(f"doc{index:03d}: " + "\n".join(lines))
    return documents


def write_documents(directory: Path, documents: list[str], fmt: str = "txt") -> str:
    """Writes documents as one .txt file each, two .jsonl files or one .parquet file.

    Returns:
        A glob pattern matching the written files (documents stay in order).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        for index, text in enumerate(documents):
            (directory / f"doc_{index:03d}.txt").write_text(text)
        return str(directory / "*.txt")
    if fmt == "jsonl":
        half = len(documents) // 2
        for part, chunk in enumerate((documents[:half], documents[half:])):
            lines = [json.dumps({"id": index, "body": text}) for index, text in enumerate(chunk)]
            (directory / f"part_{part}.jsonl").write_text("\n".join(lines) + "\n")
        return str(directory / "*.jsonl")
    if fmt == "parquet":
        pq.write_table(pa.table({"body": documents, "id": list(range(len(documents)))}), directory / "all.parquet")
        return str(directory / "*.parquet")
    raise ValueError(fmt)


def make_tokenizer(directory: Path, documents: list[str], vocab_size: int = 300) -> tuple[Path, Tokenizer]:
    """Trains a tiny byte-level BPE on the documents; returns its path and the tokenizer."""
    pattern = write_documents(directory / "tokenizer_corpus", documents)
    path = directory / "tokenizer" / "tokenizer.json"
    return path, train_tokenizer([pattern], vocab_size, path)


def make_config(tmp_path: Path, pattern: str, tokenizer: Path, **overrides: object) -> DataConfig:
    """A DataConfig for tiny tests: short sequences, one tokenizing process, cache under tmp_path."""
    settings: dict[str, object] = {
        "data_files": [pattern],
        "tokenizer": str(tokenizer),
        "seq_len": 16,
        "cache_dir": str(tmp_path / "cache"),
        "val_fraction": 0.25,
        "num_proc": 1,
        "text_field": "text" if pattern.endswith(".txt") else "body",
    }
    settings.update(overrides)
    return DataConfig(**settings)


def make_mixture(tmp_path: Path, weights: dict[str, float] | None = None, **overrides: object):
    """Two (or more) small sources with their own documents, a tokenizer trained on all of them, and the
    shared settings: returns (DataConfig without documents, [CorpusSource, ...])."""
    from sdmoe_train.data.config import CorpusSource

    weights = weights or {"plays": 3.0, "psalms": 1.0}
    sources, everything = [], []
    for index, (name, weight) in enumerate(weights.items()):
        documents = [f"{name} {text}" for text in make_documents(count=12 + 6 * index, seed=10 + index)]
        everything += documents
        sources.append(CorpusSource(name=name, data_files=[write_documents(tmp_path / name, documents)], weight=weight))
    tokenizer_path, _ = make_tokenizer(tmp_path, everything)
    settings: dict[str, object] = {
        "tokenizer": str(tokenizer_path),
        "seq_len": 16,
        "cache_dir": str(tmp_path / "cache"),
        "val_fraction": 0.25,
        "num_proc": 1,
    }
    settings.update(overrides)
    return DataConfig(**settings), sources
