"""Where a recipe's tokens come from: the sources it names, and their token caches or prepared directory.

A single-corpus recipe has one source, ``data.corpus`` itself, named ``corpus``; a mixture has the
sources of ``data.corpora``. Every source is tokenized into its own token cache under
``data.corpus.cache_dir`` (:mod:`sdmoe_train.data.cache`), or, when the recipe sets
``data.prepared_dir``, into that prepared directory (:mod:`sdmoe_train.data.prepared`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer

from sdmoe_train.data.cache import TokenCache, build_token_cache, load_token_cache
from sdmoe_train.data.config import SINGLE_CORPUS_NAME, CorpusSource, DataConfig, SourceSettings
from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.data.prepared import PREPARED_FILE, open_prepared, prepare_sources, read_metadata
from sdmoe_train.errors import ConfigError


def recipe_sources(corpus: DataConfig, corpora: list[CorpusSource] | None) -> dict[str, SourceSettings]:
    """The sources of a recipe's data section, by name.

    Args:
        corpus: ``data.corpus``: the shared settings, and the documents of a single-corpus recipe.
        corpora: ``data.corpora``, the sources of a mixture; None for a single corpus.

    Returns:
        Name -> source: the mixture's sources in order, or ``{"corpus": corpus}``.

    Raises:
        ConfigError: If no source names documents, both sections do, or two sources share a name.
    """
    if corpora is None:
        corpus.require_source()
        return {SINGLE_CORPUS_NAME: corpus}
    if not corpora:
        raise ConfigError(
            "data.corpora=[] lists no source; list at least one ({name, data_files, weight}) or remove it and "
            "name the documents in data.corpus.data_files"
        )
    if corpus.has_source:
        raise ConfigError(
            f"data.corpus.data_files={corpus.data_files} / data.corpus.dataset_name={corpus.dataset_name!r} and "
            "data.corpora both name documents; with data.corpora, data.corpus holds only the shared settings "
            "(tokenizer, seq_len, cache_dir, ...): move the documents into a data.corpora entry"
        )
    duplicates = sorted(name for name, count in Counter(source.name for source in corpora).items() if count > 1)
    if duplicates:
        raise ConfigError(f"data.corpora names {duplicates} more than once; every source needs its own name")
    return {source.name: source for source in corpora}


def build_token_data(
    corpus: DataConfig, sources: dict[str, SourceSettings], tokenizer: Tokenizer, prepared_dir: str | None
) -> dict[str, TokenCache]:
    """Tokenizes every source that is not yet cached or prepared (what ``sdmoe-train prepare`` runs).

    Returns:
        Source name -> its opened token data.

    Raises:
        ConfigError: If files are missing, or ``prepared_dir`` holds data prepared from other inputs.
    """
    if prepared_dir is not None:
        prepared = prepare_sources(corpus, sources, tokenizer, prepared_dir)
        return {name: source.cache for name, source in prepared.items()}
    return {name: build_token_cache(corpus, tokenizer, source) for name, source in sources.items()}


def ensure_token_data(
    corpus: DataConfig, sources: dict[str, SourceSettings], tokenizer: Tokenizer, prepared_dir: str | None
) -> None:
    """Makes the token data of every source available, tokenizing only what is missing.

    A prepared directory that holds every source is only checked, so runs need neither the raw text
    nor the time to tokenize it.
    """
    if prepared_dir is not None and _prepared_has(Path(prepared_dir).expanduser(), sources):
        open_prepared(prepared_dir, corpus, tokenizer, list(sources))
    else:
        build_token_data(corpus, sources, tokenizer, prepared_dir)


def open_token_data(
    corpus: DataConfig, sources: dict[str, SourceSettings], tokenizer: Tokenizer, prepared_dir: str | None
) -> dict[str, TokenCache]:
    """Opens the token data of every source without building any.

    Raises:
        ConfigError: If some is missing, damaged or does not fit the recipe.
    """
    if prepared_dir is not None:
        prepared = open_prepared(prepared_dir, corpus, tokenizer, list(sources))
        return {name: source.cache for name, source in prepared.items()}
    return {name: load_token_cache(corpus, tokenizer, source) for name, source in sources.items()}


def _prepared_has(directory: Path, sources: dict[str, SourceSettings]) -> bool:
    return (directory / PREPARED_FILE).is_file() and set(sources) <= set(read_metadata(directory)["sources"])


def validation_blocks(corpus: DataConfig, cache: TokenCache, source: str | None = None) -> PackedBlocks | None:
    """The validation examples of one source; None when ``data.corpus.val_fraction`` is 0 (no validation).

    An empty validation split is treated like one too short for a single example: both are refused,
    because a run that asked for validation must not silently never validate.

    Args:
        corpus: The shared data settings (``val_fraction``, ``seq_len``).
        cache: The source's token data.
        source: Name of the mixture source, for messages; None for a single corpus.

    Raises:
        ConfigError: If ``val_fraction`` > 0 but the split holds no document or fewer than ``seq_len`` + 1 tokens.
    """
    if corpus.val_fraction == 0:
        return None
    splits = cache.manifest["splits"]
    if splits["validation"]["num_docs"] == 0:
        owner = "the validation split" if source is None else f"the validation split of source {source!r}"
        documents = splits["train"]["num_docs"]
        raise ConfigError(
            f"{owner} is empty: data.corpus.val_fraction={corpus.val_fraction} holds out whole documents, and the "
            f"source has {documents} document(s), all kept for training (one document is never held out); add "
            "documents (a .txt file is one document: split a large one into several files), or set "
            "data.corpus.val_fraction=0 to train without validation"
        )
    return PackedBlocks(cache.val_tokens, corpus.seq_len, "validation", source)
