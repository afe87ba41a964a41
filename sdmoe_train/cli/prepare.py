"""``sdmoe-train prepare``: train the tokenizer (when missing) and build the token cache of a recipe's data section.

No model is built; the same ``--config`` file as ``fit`` is accepted (:mod:`sdmoe_train.cli.recipe`).
SIGTERM and SIGUSR1 (``scancel``, Slurm's time-limit warning) stop it within moments, also while worker
processes tokenize: nothing half-written is kept, it says what was interrupted and exits with 128 + the
signal's number, as a shell reports a command a signal ended (so ``prepare && fit`` does not go on).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from jsonargparse import ArgumentParser

from sdmoe_train import signals
from sdmoe_train.cli.recipe import recipe_data_parser
from sdmoe_train.data import train_corpus_tokenizer

USAGE = """\
  sdmoe-train prepare --config RECIPE.yaml [--retrain_tokenizer true]
      train the tokenizer if its file is missing, then tokenize and cache every source of the corpus or
      mixture (into data.prepared_dir when the recipe sets it)
"""


def _parser() -> ArgumentParser:
    parser = recipe_data_parser(
        "sdmoe-train prepare",
        "Train the tokenizer (if missing) and build the token cache for a recipe's data section.",
    )
    parser.add_argument("--retrain_tokenizer", type=bool, default=False, help="retrain even if the file exists")
    return parser


def run(argv: list[str]) -> None:
    """``sdmoe-train prepare``: tokenizer training and token-cache (or prepared-data) building."""
    replaced = signals.install_signal_flags([signal.SIGTERM, signal.SIGUSR1])
    try:
        with signals.interruptible(signals.DATA_PREPARATION):
            _prepare(argv)
    except signals.StopRequested as stop:
        print(
            f"sdmoe-train prepare: {stop}; nothing half-written was kept: run prepare again to finish "
            "(sources completed earlier are reused)",
            file=sys.stderr,
        )
        raise SystemExit(128 + stop.signum) from None
    finally:
        signals.restore_signal_handlers(replaced)


def _prepare(argv: list[str]) -> None:
    parser = _parser()
    config = parser.parse_args(argv)
    data = parser.instantiate(config).data
    corpus = data.corpus
    tokenizer_path = Path(corpus.tokenizer)
    if config.retrain_tokenizer or not tokenizer_path.exists():
        started = time.perf_counter()
        train_corpus_tokenizer(corpus, tokenizer_path, list(data.sources.values()))
        print(
            f"trained a {corpus.vocab_size}-token byte-level BPE tokenizer in {time.perf_counter() - started:.1f} s "
            f"-> {tokenizer_path}"
        )
    if corpus.streaming:
        print("data.corpus.streaming=true: documents are tokenized while training; no token cache to build")
        return
    started = time.perf_counter()
    token_data = data.build_token_data()
    where = "prepared data" if data.prepared_dir is not None else "token cache"
    for name, cache in token_data.items():
        print(
            f"{where} of {name!r} ready in {cache.path}: "
            f"{len(cache.train_tokens):,} train / {len(cache.val_tokens):,} validation tokens"
        )
        skipped = cache.manifest.get("skipped_rows")
        if skipped is not None:
            print(
                f"  skipped {skipped['count']:,} of {skipped['total']:,} rows without text in {name!r} "
                f"(first: {skipped['first']})"
            )
    print(f"{where} ready in {time.perf_counter() - started:.1f} s")
