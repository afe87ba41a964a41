"""Byte-level BPE tokenizer: training, loading, the end-of-document token and document encoding.

Training is an explicit, separate step (``sdmoe-train prepare``); the data module only loads a tokenizer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sdmoe_train.data.config import DataConfig, SourceSettings
from sdmoe_train.data.documents import document_texts, load_documents
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import write_text_atomically

EOS_TOKEN = "<|endoftext|>"
"""End-of-document token of tokenizers trained here (GPT-2 / Qwen spelling)."""

EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>")
"""End-of-document tokens recognised in pretrained tokenizers, in order of preference."""

TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(files: list[str], vocab_size: int, output_path: str | Path, text_field: str = "text") -> Tokenizer:
    """Trains a byte-level BPE tokenizer on local documents and writes it atomically.

    ``<|endoftext|>`` is the only special token and gets id 0. Every byte is in the initial alphabet,
    so any text can be encoded without an unknown token.

    Args:
        files: Local files or glob patterns (.txt, .jsonl/.json or .parquet, one format).
        vocab_size: Size of the vocabulary including ``<|endoftext|>``; at least 257.
        output_path: Where to write tokenizer.json; parent directories are created.
        text_field: Column holding the text in json/parquet files (a .txt file is one document).

    Returns:
        The trained tokenizer.

    Raises:
        ConfigError: If a pattern matches no file, formats are mixed or vocab_size is too small.
    """
    _check_vocab_size(vocab_size)
    source = SourceSettings(data_files=list(files), text_field=text_field)
    texts = document_texts(load_documents(source, streaming=True), source)
    return _train_on(texts, vocab_size, Path(output_path))


def train_corpus_tokenizer(
    config: DataConfig, output_path: str | Path, sources: Sequence[SourceSettings] | None = None
) -> Tokenizer:
    """Trains the byte-level BPE tokenizer of a corpus or a mixture, streaming each source once.

    A mixture's tokenizer is trained on the concatenation of its sources, every document once,
    whatever the mixture weights: the tokenizer (and with it every token cache) then stays valid
    when the weights change.

    Args:
        config: The shared data settings; ``config.vocab_size`` sets the vocabulary size.
        output_path: Where to write tokenizer.json.
        sources: The sources to train on (``data.corpora``); None trains on ``config``'s own source.

    Returns:
        The trained tokenizer.

    Raises:
        ConfigError: If a source is already tokenized (``token_field``).
    """
    _check_vocab_size(config.vocab_size)
    sources = sources or [config]
    tokenized = [source.setting_prefix for source in sources if source.token_field is not None]
    if tokenized:
        raise ConfigError(
            f"{', '.join(tokenized)} hold token ids, which only the tokenizer that produced them can read; "
            f"set data.corpus.tokenizer={config.tokenizer!r} to that tokenizer instead of training a new one"
        )
    texts = [document_texts(load_documents(source, streaming=True), source) for source in sources]
    return _train_on(itertools.chain.from_iterable(texts), config.vocab_size, Path(output_path))


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 257:
        raise ConfigError(f"vocab_size={vocab_size} must be >= 257 (256 bytes + {EOS_TOKEN})")


def _train_on(texts: Iterable[str], vocab_size: int, output_path: Path) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # A crash while writing must not leave a truncated tokenizer.json that a later run would load.
    write_text_atomically(output_path, tokenizer.to_str())
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a tokenizer.json file, or the tokenizer.json inside a pretrained tokenizer directory.

    Args:
        path: A tokenizer.json file or a directory containing one.

    Returns:
        The tokenizer.

    Raises:
        ConfigError: If no tokenizer.json exists there or it cannot be parsed.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise ConfigError(
            f"data.corpus.tokenizer={str(path)!r}: no tokenizer file at {file}; train one first with "
            "`sdmoe-train prepare --config <recipe>` or point data.corpus.tokenizer at a tokenizer.json "
            "file or a directory holding one"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise ConfigError(
            f"data.corpus.tokenizer={str(path)!r}: {file} is not a readable tokenizer.json ({error})"
        ) from error


def eos_token_id(tokenizer: Tokenizer) -> int:
    """Returns the id of the end-of-document token.

    Args:
        tokenizer: Any ``tokenizers`` tokenizer.

    Returns:
        The id of the first of ``<|endoftext|>``, ``</s>``, ``<eos>`` present in the vocabulary.

    Raises:
        ConfigError: If the vocabulary has none of them.
    """
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ConfigError(
        f"data.corpus.tokenizer has none of the end-of-document tokens {list(EOS_CANDIDATES)}; "
        "documents are separated by one, so use a tokenizer that defines it"
    )


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str | None], eos_id: int) -> list[list[int]]:
    """Tokenizes documents and appends the end-of-document token to each.

    The tokenizer's own special tokens (a BOS added by a post-processor, say) are left out so that
    the packed stream is exactly ``doc, EOS, doc, EOS, ...`` whatever tokenizer is used.

    Args:
        tokenizer: The tokenizer.
        texts: Document texts; None (a null field) counts as an empty document.
        eos_id: Id appended after every document.

    Returns:
        One token id list per document, each ending in ``eos_id``.
    """
    encodings = tokenizer.encode_batch([text or "" for text in texts], add_special_tokens=False)
    return [encoding.ids + [eos_id] for encoding in encodings]
