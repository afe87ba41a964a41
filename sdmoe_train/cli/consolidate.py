"""``sdmoe-train consolidate``: one checkpoint file from the per-rank directory of an expert-parallel run."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdmoe_train.checkpointing.consolidate import write_consolidated_checkpoint
from sdmoe_train.cli.outputs import check_output_file

USAGE = """\
  sdmoe-train consolidate CHECKPOINT_DIR OUT.ckpt
      join the per-rank files of an MoEDeepSpeedStrategy checkpoint into one file with all experts, which
      PretrainModule.load_from_checkpoint reads and model.init_from starts a run from at any ep_size
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdmoe-train consolidate",
        description="Write the model weights, hyper-parameters and token count of an expert-parallel checkpoint "
        "directory as one file (no optimizer state).",
    )
    parser.add_argument("checkpoint_dir", type=Path, help="a checkpoint directory written by MoEDeepSpeedStrategy")
    parser.add_argument("out", type=Path, help="the consolidated .ckpt file to write")
    return parser


def run(argv: list[str]) -> None:
    """Run ``consolidate`` with its arguments (ConfigError propagates to the caller)."""
    args = _parser().parse_args(argv)
    check_output_file(args.out, "OUT.ckpt")
    print(f"wrote {write_consolidated_checkpoint(args.checkpoint_dir, args.out)}")
