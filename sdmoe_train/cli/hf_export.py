"""``sdmoe-train export``: a training checkpoint as a Hugging Face transformers checkpoint directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdmoe_train.interop.hf.checkpoints import export_checkpoint
from sdmoe_train.interop.hf.families import export_adapters

USAGE = """\
  sdmoe-train export CKPT OUT_DIR --format hf [--tokenizer PATH] [--max_shard_size 5GB] [--arch NAME]
                     [--drop_ssmoe] [--overwrite]
      write config.json + safetensors (+ tokenizer) for transformers' Qwen2-MoE, Qwen3-MoE or DeepSeek-V3
      into an empty OUT_DIR (--overwrite: replace an earlier export's files there)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdmoe-train export",
        description="Write a training checkpoint as a transformers checkpoint directory (exact or refused).",
    )
    parser.add_argument("ckpt", type=Path, help="Lightning .ckpt written by `sdmoe-train fit`")
    parser.add_argument("out_dir", type=Path, help="directory for config.json, safetensors and tokenizer files")
    parser.add_argument("--format", choices=["hf"], default="hf", help="output format (only hf)")
    adapters = export_adapters()
    parser.add_argument(
        "--arch",
        choices=[adapter.model_type for adapter in adapters],
        default=None,
        help="target architecture; default: the one matching the checkpoint's arch ("
        + ", ".join(f"{adapter.model_type} = {adapter.model_class}" for adapter in adapters)
        + ")",
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json or tokenizer directory to copy")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file, e.g. 2GB (default 5GB)")
    parser.add_argument(
        "--drop_ssmoe",
        action="store_true",
        help="export a checkpoint with SSMoE spectral routers by keeping only its learned routers (c = 0); "
        "without it such a checkpoint is refused, since transformers has no spectral router",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="OUT_DIR may hold an earlier export: its weights, index, config and tokenizer files are replaced "
        "(other files stay); without it a directory that is not empty is refused",
    )
    return parser


def run(argv: list[str]) -> None:
    """Run ``export`` with its arguments (ConfigError propagates to the caller)."""
    args = _parser().parse_args(argv)
    written = export_checkpoint(
        args.ckpt,
        args.out_dir,
        args.arch,
        args.tokenizer,
        args.max_shard_size,
        drop_ssmoe=args.drop_ssmoe,
        overwrite=args.overwrite,
    )
    for note in written.notes:
        print(f"converted: {note}")
    print(f"exported {args.ckpt} as {written.arch} ({written.model_class}) -> {args.out_dir}")
    if args.tokenizer is None:
        print(
            "no tokenizer written: AutoTokenizer cannot load this directory; export again with --overwrite "
            "--tokenizer PATH (the run's data.corpus.tokenizer) to include it"
        )
