"""A tiny trained SD-MoE run, offline tasks built from its held-out documents, and a state probe, for the
evaluation tests."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import yaml

from sdmoe_train.cli import main
from tests.integration.test_cli import _write_recipe

TASKS = "tiny"
"""Tag of the two tasks ``build-eval-tasks`` writes for the tiny corpus."""


@dataclass(frozen=True)
class TinyRun:
    recipe: Path
    checkpoint: Path
    tasks_dir: Path

    def evaluate_args(self, *extra: str) -> list[str]:
        """``sdmoe-train evaluate`` arguments for the run's checkpoint on the tiny tasks."""
        return [
            "evaluate",
            "--config",
            str(self.recipe),
            "--ckpt_path",
            str(self.checkpoint),
            "--include_path",
            str(self.tasks_dir),
            "--tasks",
            TASKS,
            "--bootstrap_iters",
            "0",
            *extra,
        ]


def train_tiny_run(directory: Path, max_steps: int = 4) -> TinyRun:
    """Prepares and fits the tiny recipe of ``test_cli`` (SD-MoE, Qwen2-MoE layout) in-process, then builds its
    offline tasks."""
    recipe = _write_recipe(directory, max_steps=max_steps)
    settings = yaml.safe_load(recipe.read_text())
    settings["model"]["sdmoe"] = {"enabled": True, "rank": 4}
    # The features of Qwen2-MoE, so that the checkpoint exports to transformers.
    settings["model"]["arch"]["attention"]["qkv_bias"] = True
    settings["model"]["arch"]["moe"].update(num_shared_experts=1, shared_expert_gate=True)
    recipe.write_text(yaml.safe_dump(settings))
    argv = sys.argv
    sys.argv = ["sdmoe-train"]  # LightningCLI warns when pytest's argv sits next to explicit arguments
    try:
        main(["prepare", "--config", str(recipe)])
        main(["fit", "--config", str(recipe)])
        main(
            [
                "build-eval-tasks",
                "--config",
                str(recipe),
                "--out",
                str(directory / "tasks"),
                "--name",
                TASKS,
                "--next_line_items",
                "12",
                "--last_word_items",
                "12",
                "--fewshot_items",
                "2",
                "--perplexity_chars",
                "400",
                "--perplexity_docs",
                "4",
            ]
        )
    finally:
        sys.argv = argv
    return TinyRun(recipe, directory / "run" / "checkpoints" / "last.ckpt", directory / "tasks")


class StateProbe(L.Callback):
    """Records, at the end of every training batch, everything a callback running later must leave unchanged:
    the global random states, train mode, parameters, buffers and gradients. ``StateProbe("check")`` placed
    after the callback under test compares against what ``StateProbe("record")`` placed before it saw."""

    recorded: ClassVar[dict[str, Any]] = {}
    differences: ClassVar[list[str]] = []
    checked_steps: ClassVar[list[int]] = []

    def __init__(self, role: str) -> None:
        self.role = role

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state()[1].tolist(),
            "torch": torch.get_rng_state(),
            "training": pl_module.training,
            "tensors": {name: value.clone() for name, value in pl_module.state_dict().items()},
            "grads": {name: p.grad.clone() for name, p in pl_module.named_parameters() if p.grad is not None},
        }
        if self.role == "record":
            StateProbe.recorded = state
            return
        StateProbe.checked_steps.append(trainer.global_step)
        recorded = StateProbe.recorded
        for key in ("python", "numpy", "training"):
            if state[key] != recorded[key]:
                StateProbe.differences.append(f"step {trainer.global_step}: {key}")
        if not torch.equal(state["torch"], recorded["torch"]):
            StateProbe.differences.append(f"step {trainer.global_step}: torch random state")
        for kind in ("tensors", "grads"):
            if state[kind].keys() != recorded[kind].keys() or any(
                not torch.equal(value, recorded[kind][name]) for name, value in state[kind].items()
            ):
                StateProbe.differences.append(f"step {trainer.global_step}: {kind}")
