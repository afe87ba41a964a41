"""Consolidate a :class:`~sdmoe_train.parallel.deepspeed.MoEDeepSpeedStrategy` checkpoint into one file.

``sdmoe-train consolidate CHECKPOINT_DIR OUT.ckpt`` reads the per-rank files, joins the
expert slices of the first expert-parallel group (ranks 0..P-1; other groups hold replicas) into full
(E, ...) tensors and writes a Lightning-style checkpoint with the model weights, hyper-parameters and
token count but no optimizer state. It loads with ``PretrainModule.load_from_checkpoint`` and starts a run
at any ``ep_size`` through ``model.init_from``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdmoe_train.checkpointing.manifest import checkpoint_problem
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import atomic_path
from sdmoe_train.parallel.expert_parallel import merge_expert_shards
from sdmoe_train.parallel.rank_files import LAYOUT_KEY, rank_file

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
    rank0 = _load_rank_file(first)
    layout = rank0[LAYOUT_KEY]
    shards = [rank0["state_dict"]]
    for ep_rank in range(1, layout["ep_size"]):
        path = rank_file(directory, ep_rank)
        if not path.is_file():
            raise ConfigError(f"{str(directory)!r} lacks {path.name} (written with ep_size={layout['ep_size']})")
        shards.append(_load_rank_file(path)["state_dict"])
    consolidated = {key: rank0[key] for key in _KEPT_ENTRIES if key in rank0}
    if "hyper_parameters" in consolidated:
        # The file holds every expert: it loads into one process, and a run chooses its own layout.
        consolidated["hyper_parameters"] = {**consolidated["hyper_parameters"], "parallel": None}
    consolidated["state_dict"] = merge_expert_shards(shards, layout["sharded"])
    return consolidated


def _load_rank_file(path: Path) -> dict[str, Any]:
    """One rank's file, refused with its name when it is damaged or was not written by MoEDeepSpeedStrategy."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"cannot consolidate: {problem}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or LAYOUT_KEY not in state or "state_dict" not in state:
        raise ConfigError(
            f"cannot consolidate: {path} has no expert-parallel layout; pass a checkpoint directory of "
            "MoEDeepSpeedStrategy"
        )
    return state


def write_consolidated_checkpoint(directory: str | Path, out: str | Path) -> Path:
    """:func:`consolidate_checkpoint` of ``directory`` written atomically to ``out``; returns ``out``."""
    consolidated = consolidate_checkpoint(directory)
    with atomic_path(out) as temp:
        torch.save(consolidated, temp)
    return Path(out)
