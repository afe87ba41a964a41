"""Tiny `sdmoe-train fit` runs in subprocesses, for tests that kill, signal or requeue them (no tests here)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from sdmoe_train.cli import main
from tests.corpora import make_documents, write_documents
from tests.integration.loss_recorder import read_losses

REPO = Path(__file__).resolve().parents[2]


def write_tiny_recipe(
    tmp_path: Path, *, max_steps: int, devices: int = 1, every_n_steps: int = 2, mixture: bool = False
) -> Path:
    """A prepared recipe (tokenizer + token cache built) for a 2-layer SD-MoE DeepSeek-style model with
    routing-bias balancing, checkpointing every ``every_n_steps`` into ``tmp_path/run/checkpoints``.

    ``mixture=True`` trains on two weighted sources (``plays`` and ``psalms``, equal weights; the small second
    one repeats within a few steps) with document-aware attention and restarted positions."""
    corpus = write_documents(tmp_path / "corpus", make_documents(count=24, min_words=60, max_words=120))
    run_dir = tmp_path / "run"
    recipe: dict[str, Any] = {
        "seed_everything": 7,
        "model": {
            "arch": {
                "vocab_size": 300,
                "hidden_dim": 32,
                "n_layers": 2,
                "dense_hidden_dim": 64,
                "max_seq_len": 32,
                "attention": {"num_heads": 2, "num_kv_heads": 1},
                "moe": {
                    "num_experts": 4,
                    "top_k": 2,
                    "expert_hidden_dim": 32,
                    "score_fn": "sigmoid",
                    "aux_loss_coef": 0.01,
                    "bias_update_rate": 0.01,
                },
            },
            "optim": {"lr": 0.003, "warmup_steps": 1},
            "sdmoe": {"enabled": True, "rank": 4, "refresh_every": 3},
        },
        "data": {
            "corpus": {
                "data_files": [corpus],
                "tokenizer": str(tmp_path / "tokenizer.json"),
                "vocab_size": 300,
                "seq_len": 32,
                "cache_dir": str(tmp_path / "cache"),
                "val_fraction": 0.1,
                "num_proc": 1,
            },
            "batch_size": 2,
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "max_steps": max_steps,
            "val_check_interval": 4,
            "limit_val_batches": 2,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_dir),
            "logger": False,
            "callbacks": [
                {
                    "class_path": "sdmoe_train.lightning.callbacks.PeriodicCheckpoint",
                    "init_args": {
                        "dirpath": str(run_dir / "checkpoints"),
                        "every_n_train_steps": every_n_steps,
                        "keep_last_k": 2,
                        "save_last": True,
                    },
                },
                {
                    "class_path": "tests.integration.loss_recorder.LossRecorder",
                    "init_args": {"directory": str(run_dir)},
                },
            ],
        },
    }
    if devices > 1:
        recipe["trainer"]["strategy"] = "ddp"
    if mixture:
        psalms = write_documents(tmp_path / "psalms", make_documents(count=4, seed=5, min_words=30, max_words=40))
        del recipe["data"]["corpus"]["data_files"]
        recipe["data"]["corpora"] = [
            {"name": "plays", "data_files": [corpus], "weight": 0.5},
            {"name": "psalms", "data_files": [psalms], "weight": 0.5},
        ]
        recipe["data"]["cross_document_attention"] = False
        recipe["data"]["restart_positions"] = True
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    main(["prepare", "--config", str(path)])
    return path


def fit_command(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdmoe_train.cli", "fit", "--config", str(recipe), *extra]


def subprocess_env() -> dict[str, str]:
    """One thread per process (bitwise-reproducible CPU kernels), this checkout first on the path."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_fit(recipe: Path, log_path: Path, *extra: str) -> subprocess.Popen:
    """Starts `sdmoe-train fit` in its own process group (DDP children included), output to ``log_path``."""
    log = open(log_path, "ab")  # noqa: SIM115 (handed to the child, closed when the test ends)
    return subprocess.Popen(
        fit_command(recipe, *extra),
        cwd=REPO,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_fit(recipe: Path, log_path: Path, *extra: str, timeout: float = 300) -> int:
    process = start_fit(recipe, log_path, *extra)
    return process.wait(timeout=timeout)


def wait_for_step(loss_file: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Blocks until ``loss_file`` records ``step`` (or the process ends, or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(recorded >= step for recorded, _ in read_losses(loss_file)):
            return
        if process.poll() is not None:
            raise AssertionError(f"the run exited with {process.returncode} before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout} s")


def final_losses(loss_file: Path) -> dict[int, str]:
    """Step -> loss of the last time each step was run (a resumed run repeats the steps after its checkpoint)."""
    return dict(read_losses(loss_file))
