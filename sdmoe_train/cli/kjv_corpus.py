"""``sdmoe-train kjv-corpus``: write the King James Bible, one file per chapter (``make kjv-corpus`` runs it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdmoe_train.cli.outputs import check_output_directory
from sdmoe_train.data.kjv_corpus import install_kjv_corpus
from sdmoe_train.errors import ConfigError

USAGE = """\
  sdmoe-train kjv-corpus DEST
      write the King James Bible from Debian's bible-kjv package into DEST, one .txt file per chapter
      (1,189 documents; the second corpus of recipes/tiny_qwen_cpu_mixture.yaml; idempotent)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdmoe-train kjv-corpus",
        description="Install the King James Bible (public domain) from Debian's bible-kjv package, one file per "
        "chapter.",
    )
    parser.add_argument("destination", type=Path, help="directory that receives one .txt file per chapter")
    return parser


def run(argv: list[str]) -> None:
    """Run ``kjv-corpus`` with its arguments."""
    args = _parser().parse_args(argv)
    check_output_directory(args.destination, "DEST")
    try:
        files = install_kjv_corpus(args.destination)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from error
    size_mb = sum(file.stat().st_size for file in files) / 1e6
    print(f"{len(files)} chapters ({size_mb:.1f} MB) in {args.destination}")
