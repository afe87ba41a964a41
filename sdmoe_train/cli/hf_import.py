"""``sdmoe-train import``: a Hugging Face transformers checkpoint as our ``model.yaml`` preset plus weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdmoe_train.errors import ConfigError
from sdmoe_train.interop.hf.checkpoints import import_checkpoint

USAGE = """\
  sdmoe-train import HF_DIR OUT_DIR [--upcycle_experts N --upcycle_top_k K] [--overwrite]
      write OUT_DIR/model.yaml (the model.arch recipe section) and OUT_DIR/model.ckpt (weights) into an
      empty OUT_DIR (--overwrite: replace an earlier import's files there)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdmoe-train import",
        description="Turn a transformers Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 (or dense Qwen2 / Qwen3) checkpoint "
        "into our preset + weights.",
    )
    parser.add_argument("hf_dir", type=Path, help="directory holding config.json and *.safetensors")
    parser.add_argument("out_dir", type=Path, help="receives model.yaml, model.ckpt and the tokenizer files")
    parser.add_argument(
        "--upcycle_experts",
        type=int,
        default=None,
        help="dense checkpoint (qwen2, qwen3) only: copy each MLP into this many experts (sparse upcycling)",
    )
    parser.add_argument("--upcycle_top_k", type=int, default=2, help="experts per token after upcycling (default 2)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="OUT_DIR may hold an earlier import: its model.yaml, model.ckpt and tokenizer files are replaced "
        "(other files stay); without it a directory that is not empty is refused",
    )
    return parser


def run(argv: list[str]) -> None:
    """Run ``import`` with its arguments (ConfigError propagates to the caller)."""
    args = _parser().parse_args(argv)
    if args.upcycle_experts is not None:
        # Checked before the checkpoint is read, under the names the user typed.
        if args.upcycle_experts < 1:
            raise ConfigError(f"--upcycle_experts={args.upcycle_experts} must be >= 1 (experts per upcycled layer)")
        if not 1 <= args.upcycle_top_k <= args.upcycle_experts:
            raise ConfigError(
                f"--upcycle_top_k={args.upcycle_top_k} must lie in [1, --upcycle_experts={args.upcycle_experts}]"
            )
    written = import_checkpoint(
        args.hf_dir, args.out_dir, args.upcycle_experts, args.upcycle_top_k, overwrite=args.overwrite
    )
    for note in written.notes:
        print(f"converted: {note}")
    print(
        f"imported {args.hf_dir} -> {written.arch_file} (use as --model.arch) and {written.weights} "
        "(PretrainModule.load_from_checkpoint)"
    )
