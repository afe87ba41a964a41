"""`sdmoe-train` end to end: recipes parse, prepare + fit + resume on a tiny corpus, bad input fails early."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from sdmoe_train.cli import SUBCOMMANDS, main
from sdmoe_train.data import cache as cache_module
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.report.dashboard import read_run
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
            # The run directory: logs, checkpoints, the lock and the W&B id are derived from it.
            "default_root_dir": str(run_dir),
            "callbacks": [
                {
                    "class_path": "sdmoe_train.lightning.callbacks.PeriodicCheckpoint",
                    "init_args": {"every_n_train_steps": 3, "save_last": True},
                }
            ],
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _logged_steps(run_dir: Path) -> list[int]:
    """Steps with a training loss, over every attempt of the run, as `sdmoe-train report` joins them."""
    return [int(step) for step, _ in read_run(run_dir).scalars["train/lm_loss"]]


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


def test_one_run_directory_keeps_every_attempts_metrics_and_refuses_bad_resumes_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _write_recipe(tmp_path, max_steps=4)
    main(["prepare", "--config", str(recipe)])
    run_dir = tmp_path / "elsewhere"
    moved = ["--config", str(recipe), f"--trainer.default_root_dir={run_dir}"]
    main(["fit", *moved])
    assert not (tmp_path / "run").exists(), "the run directory setting must move logs and checkpoints alike"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "run.lock").exists()
    first_attempt = (run_dir / "logs" / "version_0" / "metrics.csv").read_bytes()

    # A resume the recipe check rejects exits 2 before any logger starts: no new attempt, nothing truncated.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *moved, "--trainer.max_steps=7", "--model.arch.hidden_dim=48"])
    assert exit_info.value.code == 2 and "arch.hidden_dim: checkpoint 32 != recipe 48" in capsys.readouterr().err
    assert sorted(path.name for path in (run_dir / "logs").iterdir()) == ["version_0"]
    assert (run_dir / "logs" / "version_0" / "metrics.csv").read_bytes() == first_attempt

    main(["fit", *moved, "--trainer.max_steps=7"])
    assert "resuming from" in capsys.readouterr().out
    assert _logged_steps(run_dir) == list(range(7)), "the report must show both attempts' steps"

    last = run_dir / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *moved, "--trainer.max_steps=9", "--ckpt_path=last"])
    assert exit_info.value.code == 2 and "last.ckpt does not match the SHA-256" in capsys.readouterr().err


def test_a_second_fit_on_a_run_directory_in_use_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _write_recipe(tmp_path, max_steps=3)
    main(["prepare", "--config", str(recipe)])
    hold = "import sys, time; from sdmoe_train.checkpointing.run_lock import acquire_run_lock as a; a(sys.argv[1]); "
    hold += "print('locked', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(recipe)])
        assert exit_info.value.code == 2
        assert f"is in use by another run (pid {holder.pid} on" in capsys.readouterr().err
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    main(["fit", "--config", str(recipe)])  # the killed holder's lock does not block
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_a_stop_signal_while_the_data_is_tokenized_stops_at_once_and_keeps_no_partial_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _write_recipe(tmp_path, max_steps=3)
    main(["prepare", "--config", str(recipe)])
    shutil.rmtree(tmp_path / "cache")  # the tokenizer stays; the cache must be built again by `fit`

    def scancel_then_tokenize_for_a_minute(batch: dict, tokenizer: object, eos_id: int) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)  # scancel while the cache is built
        time.sleep(60)  # a long tokenization: the signal must end it, not wait for it
        return encode_batch(batch, tokenizer, eos_id)

    encode_batch = cache_module._encode_batch
    monkeypatch.setattr(cache_module, "_encode_batch", scancel_then_tokenize_for_a_minute)
    started = time.monotonic()
    main(["fit", "--config", str(recipe)])  # returns: a clean stop (exit code 0), not a kill
    assert time.monotonic() - started < 30, "the signal waited for the tokenization to finish"
    assert "SIGTERM received: data preparation interrupted" in capsys.readouterr().err
    assert list((tmp_path / "cache").iterdir()) == [], "a partial token cache was left behind"
    assert not (tmp_path / "run" / "checkpoints" / "manifest.json").exists(), "the run trained after the signal"

    monkeypatch.setattr(cache_module, "_encode_batch", encode_batch)
    main(["fit", "--config", str(recipe)])  # the next run prepares the data again and trains
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_stop_signal_during_the_first_validation_ends_it_at_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _write_recipe(tmp_path, max_steps=3)
    main(["prepare", "--config", str(recipe)])
    validation_step = PretrainModule.validation_step
    batches: list[int] = []

    def scancel_at_the_first_batch(module: PretrainModule, batch: torch.Tensor, batch_idx: int, *args: int) -> None:
        batches.append(batch_idx)
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return validation_step(module, batch, batch_idx, *args)

    monkeypatch.setattr(PretrainModule, "validation_step", scancel_at_the_first_batch)
    main(["fit", "--config", str(recipe)])
    assert batches == [0], "the validation ran on after the signal"
    assert "SIGTERM received: validation interrupted" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists(), "the run went on to training"
