"""Shared fixtures: fixed seeds, two CPU threads, tiny configs of both model families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig
from tests.corpora import make_documents, make_tokenizer, write_documents


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(params=["tiny_qwen_moe", "tiny_deepseek_moe"])
def tiny_config(request: pytest.FixtureRequest) -> TransformerConfig:
    """A tiny preset of each model family, shrunk further so a forward pass takes milliseconds."""
    config = presets.PRESETS[request.param]()
    config.n_layers = 2
    config.vocab_size = 256
    config.max_seq_len = 64
    return config


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[list[str], str, Path, Tokenizer]:
    """Twelve documents as .txt files and a tokenizer trained on them: (documents, pattern, path, tokenizer)."""
    documents = make_documents()
    pattern = write_documents(tmp_path / "corpus", documents)
    tokenizer_path, tokenizer = make_tokenizer(tmp_path, documents)
    return documents, pattern, tokenizer_path, tokenizer
