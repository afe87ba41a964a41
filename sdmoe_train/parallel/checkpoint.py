"""Consolidate a :class:`~sdmoe_train.parallel.deepspeed.MoEDeepSpeedStrategy` checkpoint into one file.

``python -m sdmoe_train.parallel.checkpoint CHECKPOINT_DIR OUT.ckpt`` reads the per-rank files, joins the
expert slices of the first expert-parallel group (ranks 0..P-1; other groups hold replicas) into full
(E, ...) tensors and writes a Lightning-style checkpoint with the model weights, hyper-parameters and
token count but no optimizer state. It loads with ``PretrainModule.load_from_checkpoint`` and starts a run
at any ``ep_size`` through ``model.init_from``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.parallel.deepspeed import LAYOUT_KEY, rank_file
from sdmoe_train.parallel.expert_parallel import merge_expert_shards

_KEPT_ENTRIES = ("hyper_parameters", "hparams_name", "sdmoe_train", "epoch", "global_step", "pytorch-lightning_version")


def consolidate_checkpoint(directory: str | Path) -> dict[str, Any]:
    """One checkpoint dict with the full experts of a per-rank checkpoint directory.

    Raises:
        ConfigError: ``directory`` holds no rank files, or fewer than its layout needs.
    """
    first = rank_file(directory, 0)
    if not first.is_file():
        raise ConfigError(
            f"{str(directory)!r} has no {first.name}; pass a checkpoint directory of MoEDeepSpeedStrategy"
        )
    rank0 = torch.load(first, map_location="cpu", weights_only=False)
    layout = rank0[LAYOUT_KEY]
    shards = [rank0["state_dict"]]
    for ep_rank in range(1, layout["ep_size"]):
        path = rank_file(directory, ep_rank)
        if not path.is_file():
            raise ConfigError(f"{str(directory)!r} lacks {path.name} (written with ep_size={layout['ep_size']})")
        shards.append(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    consolidated = {key: rank0[key] for key in _KEPT_ENTRIES if key in rank0}
    if "hyper_parameters" in consolidated:
        # The file holds every expert: it loads into one process, and a run chooses its own layout.
        consolidated["hyper_parameters"] = {**consolidated["hyper_parameters"], "parallel": None}
    consolidated["state_dict"] = merge_expert_shards(shards, layout["sharded"])
    return consolidated


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``CHECKPOINT_DIR OUT.ckpt``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m sdmoe_train.parallel.checkpoint CHECKPOINT_DIR OUT.ckpt")
    out = Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(consolidate_checkpoint(argv[0]), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
