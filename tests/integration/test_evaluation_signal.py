"""The shipped tasks tell models apart: a briefly trained model beats chance on the multiple-choice tasks, a
freshly initialised one does not, and its perplexity is far lower."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from sdmoe_train.cli import main  # noqa: E402
from sdmoe_train.data.demo_corpus import install_demo_corpus  # noqa: E402
from sdmoe_train.models.config import AttentionConfig, MoEConfig, TransformerConfig  # noqa: E402
from sdmoe_train.models.transformer import Transformer  # noqa: E402

CHANCE = 0.25
ABOVE_CHANCE = 0.35
"""Trained accuracy floor on 400 items: 4.6 standard errors (sqrt(0.25 · 0.75 / 400) = 0.022) above chance."""
FRESH_BAND = (0.18, 0.32)
"""A fresh model's accuracy stays within about 3 standard errors of chance."""


def _recipe(tmp_path: Path, max_steps: int) -> Path:
    """The demo recipe's corpus and split, a smaller model (2 layers, width 96) and a short run."""
    install_demo_corpus(tmp_path / "plays")
    recipe = {
        "seed_everything": 1234,
        "model": {
            "arch": {
                "vocab_size": 4096,
                "hidden_dim": 96,
                "n_layers": 2,
                "dense_hidden_dim": 256,
                "max_seq_len": 128,
                "attention": {"num_heads": 4, "num_kv_heads": 2, "qkv_bias": True},
                "moe": {"num_experts": 4, "top_k": 2, "expert_hidden_dim": 128, "aux_loss_coef": 0.01},
            },
            "optim": {"lr": 0.003, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1},
        },
        "data": {
            "corpus": {
                "data_files": [str(tmp_path / "plays" / "*.txt")],
                "tokenizer": str(tmp_path / "tokenizer.json"),
                "vocab_size": 4096,
                "seq_len": 128,
                "cache_dir": str(tmp_path / "cache"),
                "val_fraction": 0.05,
            },
            "batch_size": 16,
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {
                    "class_path": "sdmoe_train.lightning.callbacks.PeriodicCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "run" / "checkpoints"), "save_last": True},
                }
            ],
        },
        "validate_before_fit": False,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _fresh_checkpoint(recipe: Path, path: Path) -> Path:
    """A checkpoint of the recipe's model as initialised (seeded), in the format ``sdmoe-train import`` writes."""
    arch = dict(yaml.safe_load(recipe.read_text())["model"]["arch"])
    config = TransformerConfig(
        **{**arch, "attention": AttentionConfig(**arch["attention"]), "moe": MoEConfig(**arch["moe"])}
    )
    torch.manual_seed(1234)
    state = {f"model.{key}": value for key, value in Transformer(config).state_dict().items()}
    lightning_version = importlib.metadata.version("lightning")
    torch.save(
        {"state_dict": state, "hyper_parameters": {"arch": config}, "pytorch-lightning_version": lightning_version},
        path,
    )
    return path


def _accuracies(recipe: Path, checkpoint: Path, out: Path) -> dict[str, float]:
    main(
        [
            "evaluate",
            "--config",
            str(recipe),
            "--ckpt_path",
            str(checkpoint),
            "--tasks",
            "shakespeare",
            "--out",
            str(out),
        ]
    )
    results = json.loads(out.read_text())["results"]
    return {task: values.get("acc,none", values.get("word_perplexity,none")) for task, values in results.items()}


@pytest.mark.slow
def test_a_briefly_trained_model_beats_chance_and_a_fresh_one_does_not(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, max_steps=300)
    argv = sys.argv
    sys.argv = ["sdmoe-train"]
    try:
        main(["prepare", "--config", str(recipe)])
        fresh = _accuracies(recipe, _fresh_checkpoint(recipe, tmp_path / "fresh.ckpt"), tmp_path / "fresh.json")
        main(["fit", "--config", str(recipe)])
        trained = _accuracies(recipe, tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "trained.json")
    finally:
        sys.argv = argv
    print(f"fresh: {fresh}\ntrained after 300 steps: {trained}")
    for task in ("shakespeare_last_word", "shakespeare_next_line"):
        assert FRESH_BAND[0] <= fresh[task] <= FRESH_BAND[1], (task, fresh[task])
    assert trained["shakespeare_last_word"] >= ABOVE_CHANCE
    assert trained["shakespeare_perplexity"] < fresh["shakespeare_perplexity"] / 10
