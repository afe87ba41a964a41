"""``sdmoe-train export`` and ``sdmoe-train import``: Hugging Face checkpoints in and out.

Kept apart from :mod:`sdmoe_train.cli` so that the LightningCLI entry point only dispatches here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdmoe_train.lightning.hf_checkpoint import export_checkpoint, import_checkpoint
from sdmoe_train.models.hf_export import HF_ARCHITECTURES, HF_MODEL_CLASSES

USAGE_EPILOG = """\
Hugging Face checkpoints:
  sdmoe-train export CKPT OUT_DIR --format hf [--tokenizer PATH] [--max_shard_size 5GB] [--arch NAME]
                     [--drop_ssmoe]
      write config.json + safetensors (+ tokenizer) for transformers' Qwen2-MoE, Qwen3-MoE or DeepSeek-V3
  sdmoe-train import HF_DIR OUT_DIR [--upcycle_experts N --upcycle_top_k K]
      write OUT_DIR/model.yaml (the model.arch recipe section) and OUT_DIR/model.ckpt (weights)
"""


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdmoe-train export",
        description="Write a training checkpoint as a transformers checkpoint directory (exact or refused).",
    )
    parser.add_argument("ckpt", type=Path, help="Lightning .ckpt written by `sdmoe-train fit`")
    parser.add_argument("out_dir", type=Path, help="directory for config.json, safetensors and tokenizer files")
    parser.add_argument("--format", choices=["hf"], default="hf", help="output format (only hf)")
    parser.add_argument(
        "--arch",
        choices=HF_ARCHITECTURES,
        default=None,
        help="target architecture; default: the one matching the checkpoint's arch ("
        + ", ".join(f"{name} = {cls}" for name, cls in HF_MODEL_CLASSES.items())
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
    return parser


def _import_parser() -> argparse.ArgumentParser:
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
    return parser


def run(command: str, argv: list[str]) -> None:
    """Run ``export`` or ``import`` with its arguments (ConfigError propagates to the caller)."""
    if command == "export":
        args = _export_parser().parse_args(argv)
        arch = export_checkpoint(
            args.ckpt, args.out_dir, args.arch, args.tokenizer, args.max_shard_size, drop_ssmoe=args.drop_ssmoe
        )
        print(f"exported {args.ckpt} as {arch} ({HF_MODEL_CLASSES[arch]}) -> {args.out_dir}")
        return
    args = _import_parser().parse_args(argv)
    weights = import_checkpoint(args.hf_dir, args.out_dir, args.upcycle_experts, args.upcycle_top_k)
    print(
        f"imported {args.hf_dir} -> {args.out_dir}/model.yaml (use as --model.arch) and {weights} "
        "(PretrainModule.load_from_checkpoint)"
    )
