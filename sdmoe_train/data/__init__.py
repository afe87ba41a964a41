"""Pretraining data: tokenizer, token cache, prepared data, packing, mixtures, resumable sampling, streaming
and the data module."""

from sdmoe_train.data.cache import TokenCache, build_token_cache, load_token_cache
from sdmoe_train.data.config import CorpusSource, DataConfig
from sdmoe_train.data.datamodule import PretrainDataModule
from sdmoe_train.data.mixture import MixtureBlocks, MixtureSampler, MixtureSchedule, MixtureSource
from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.data.prepared import open_prepared, prepare_sources
from sdmoe_train.data.sampler import ResumableDistributedSampler
from sdmoe_train.data.streaming import StreamingPackedBlocks, held_out_documents
from sdmoe_train.data.tokenizer import eos_token_id, load_tokenizer, train_corpus_tokenizer, train_tokenizer

__all__ = [
    "CorpusSource",
    "DataConfig",
    "MixtureBlocks",
    "MixtureSampler",
    "MixtureSchedule",
    "MixtureSource",
    "PackedBlocks",
    "PretrainDataModule",
    "ResumableDistributedSampler",
    "StreamingPackedBlocks",
    "TokenCache",
    "build_token_cache",
    "eos_token_id",
    "held_out_documents",
    "load_token_cache",
    "load_tokenizer",
    "open_prepared",
    "prepare_sources",
    "train_corpus_tokenizer",
    "train_tokenizer",
]
