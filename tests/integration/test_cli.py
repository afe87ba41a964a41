"""`sdmoe-train` end to end: recipes parse, prepare + fit + resume on a tiny corpus, bad input fails early."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from sdmoe_train.cli import SUBCOMMANDS, main
from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig
from tests.corpora import make_documents, write_documents

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TRAINING_RECIPES = sorted([*RECIPES.glob("*.yaml"), *RECIPES.glob("gpu/*.yaml")])


@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_model_recipe_equals_its_preset(preset: str) -> None:
    parser = ArgumentParser()
    parser.add_argument("--arch", type=TransformerConfig)
    parsed = parser.parse_args([f"--arch={RECIPES / 'models' / f'{preset}.yaml'}"])
    arch = parser.instantiate(parsed).arch
    assert dataclasses.asdict(arch) == dataclasses.asdict(presets.PRESETS[preset]())


def test_model_recipes_are_generated_from_the_presets_and_current(tmp_path: Path) -> None:
    main(["presets", "--write", str(tmp_path)])
    generated = {path.name: path.read_text() for path in tmp_path.glob("*.yaml")}
    committed = {path.name: path.read_text() for path in (RECIPES / "models").glob("*.yaml")}
    assert sorted(generated) == sorted(f"{name}.yaml" for name in presets.PRESETS)
    # A failure here means a preset function changed: run `sdmoe-train presets --write recipes/models`.
    assert committed == generated


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert all(f"\n    {name} " in shown for name in ("fit", "validate", "test"))
    assert all(f"\n  sdmoe-train {name} " in shown for name in SUBCOMMANDS), shown


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda path: path.stem)
def test_every_training_recipe_parses_and_says_what_it_is_for(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert recipe.read_text().startswith("#"), f"{recipe} must open with a comment saying what it is for"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["arch"]["moe"]["num_experts"] > 1
    assert printed["data"]["corpus"]["seq_len"] > 0


def _write_recipe(tmp_path: Path, max_steps: int) -> Path:
    corpus = write_documents(tmp_path / "corpus", make_documents(count=16, min_words=60, max_words=120))
    run_dir = tmp_path / "run"
    recipe = {
        "seed_everything": 7,
        "model": {
            "arch": {
                "vocab_size": 300,
                "hidden_dim": 32,
                "n_layers": 2,
                "dense_hidden_dim": 64,
                "max_seq_len": 32,
                "attention": {"num_heads": 2, "num_kv_heads": 1},
                "moe": {"num_experts": 4, "top_k": 2, "expert_hidden_dim": 32, "aux_loss_coef": 0.01},
            },
            "optim": {"lr": 0.003, "warmup_steps": 2},
        },
        "data": {
            "corpus": {
                "data_files": [corpus],
                "tokenizer": str(tmp_path / "tokenizer.json"),
                "vocab_size": 300,
                "seq_len": 32,
                "cache_dir": str(tmp_path / "cache"),
                "val_fraction": 0.2,
                "num_proc": 1,
            },
            "batch_size": 2,
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "val_check_interval": 3,
            "limit_val_batches": 2,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "logs", "version": ""},
            },
            "callbacks": [
                {
                    "class_path": "sdmoe_train.lightning.callbacks.PeriodicCheckpoint",
                    "init_args": {
                        "dirpath": str(run_dir / "checkpoints"),
                        "every_n_train_steps": 3,
                        "save_last": True,
                    },
                }
            ],
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "logs" / "metrics.csv") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/lm_loss")]


def test_prepare_fit_and_resume_from_last_continue_the_step_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _write_recipe(tmp_path, max_steps=7)
    main(["prepare", "--config", str(recipe)])
    prepared = capsys.readouterr().out
    assert "tokenizer" in prepared and "token cache" in prepared
    assert (tmp_path / "tokenizer.json").is_file()

    main(["fit", "--config", str(recipe)])
    fitted = capsys.readouterr().out
    assert "validation loss:" in fitted and "before training" in fitted
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    # Checkpoints every 3 steps, and `last.ckpt` also at the end of training (step 7).
    assert torch.load(last, weights_only=False)["global_step"] == 7
    assert (tmp_path / "run" / "checkpoints" / "epoch=0-step=6.ckpt").is_file()

    main(["fit", "--config", str(recipe), "--ckpt_path", "last", "--trainer.max_steps", "10"])
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 10
    assert resumed["sdmoe_train"]["tokens_seen"] == 10 * 2 * 32
    steps = _logged_steps(tmp_path / "run")
    assert max(steps) >= 9 and steps == sorted(steps)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--model.arch.moe.bogus_key=1", "bogus_key"),
        ("--model.arch.moe.score_fn=tanh", "softmax"),
        ("--trainer.max_stepz=3", "max_stepz"),
        ("--data.corpus.no_such_field=1", "no_such_field"),
    ],
)
def test_unknown_keys_and_bad_values_fail_before_training_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    recipe = _write_recipe(tmp_path, max_steps=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), override])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_invalid_combination_names_the_field_and_the_valid_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _write_recipe(tmp_path, max_steps=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--model.arch.moe.top_k=9"])
    assert exit_info.value.code == 2
    assert "moe.top_k=9 must lie in [1, moe.num_experts=4]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_tokenizer_points_to_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _write_recipe(tmp_path, max_steps=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe)])
    assert exit_info.value.code == 2
    assert "sdmoe-train prepare" in capsys.readouterr().err


def test_wandb_recipe_logs_offline_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = _write_recipe(tmp_path, max_steps=3)
    main(["prepare", "--config", str(recipe)])
    main(
        [
            "fit",
            "--config",
            str(recipe),
            "--config",
            str(RECIPES / "loggers" / "wandb.yaml"),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb-runs'}",
        ]
    )
    runs = list((tmp_path / "wandb-runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "the offline run holds no logged data"
