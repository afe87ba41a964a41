"""The texts of a recipe's validation documents and of its training documents, split as training splits them.

Token-cache mode holds out the documents :func:`~sdmoe_train.data.cache.split_documents` picks (a seeded
shuffle of document indices); streaming mode holds out the first ``streaming_val_docs`` documents of the
stream and skips every training document with the same text. Evaluation sets built from
:func:`split_texts` therefore contain only text the model never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from sdmoe_train.data.cache import split_documents
from sdmoe_train.data.config import DataConfig
from sdmoe_train.data.documents import load_documents


@dataclass(frozen=True)
class SplitTexts:
    """Document texts of both splits, each in corpus order."""

    validation: list[str]
    """Documents held out for validation (never trained on)."""
    train: list[str]
    """Documents the training split reads."""


def split_texts(config: DataConfig) -> SplitTexts:
    """Reads the corpus of ``config`` and returns its validation and training documents.

    Args:
        config: The recipe's ``data.corpus`` section; local files must exist.

    Returns:
        The texts of both splits (a null text counts as an empty document).

    Raises:
        ConfigError: If files are missing or the text column does not exist.
    """
    documents = load_documents(config, streaming=False)
    assert isinstance(documents, datasets.Dataset), "non-streaming loading returns a Dataset"
    texts = [text or "" for text in documents["text"]]
    if config.streaming:
        validation = texts[: config.streaming_val_docs]
        held_out = set(validation)
        return SplitTexts(validation, [text for text in texts[config.streaming_val_docs :] if text not in held_out])
    train_indices, val_indices = split_documents(len(texts), config.val_fraction, config.shuffle_seed)
    return SplitTexts([texts[i] for i in val_indices], [texts[i] for i in train_indices])
