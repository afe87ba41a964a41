"""Exact resume: SIGKILL or a preemption signal mid-run, then auto-resume, reproduces the uninterrupted
run's per-step training loss bit for bit, on one process and on two (gloo DDP)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from sdmoe_train.checkpointing.manifest import read_manifest
from tests.integration.loss_recorder import read_losses
from tests.integration.training_runs import final_losses, run_fit, start_fit, wait_for_step, write_tiny_recipe

MAX_STEPS = 11


def _reference(tmp_path: Path, devices: int, mixture: bool = False) -> dict[int, str]:
    recipe = write_tiny_recipe(tmp_path / "reference", max_steps=MAX_STEPS, devices=devices, mixture=mixture)
    assert run_fit(recipe, tmp_path / "reference.log") == 0, (tmp_path / "reference.log").read_text()[-3000:]
    losses = final_losses(tmp_path / "reference" / "run" / "losses_rank0.txt")
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return losses


def _interrupted(tmp_path: Path, devices: int, at_step: int, how: signal.Signals, mixture: bool = False) -> Path:
    """Runs until ``at_step``, delivers ``how`` to the whole process group, then resumes to the end."""
    recipe = write_tiny_recipe(tmp_path / "interrupted", max_steps=MAX_STEPS, devices=devices, mixture=mixture)
    run_dir = tmp_path / "interrupted" / "run"
    log = tmp_path / "interrupted.log"
    process = start_fit(recipe, log)
    wait_for_step(run_dir / "losses_rank0.txt", at_step, process)
    if how == signal.SIGKILL:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        os.kill(process.pid, how)  # rank 0 only: the ranks agree through the flag all-reduce
    returncode = process.wait(timeout=300)
    assert returncode == (-signal.SIGKILL if how == signal.SIGKILL else 0), log.read_text()[-3000:]
    interrupted_at = max(step for step, _ in read_losses(run_dir / "losses_rank0.txt"))
    assert interrupted_at < MAX_STEPS, "the run finished before it was interrupted; the test proves nothing"
    assert run_fit(recipe, log) == 0, log.read_text()[-3000:]
    assert "resuming from" in log.read_text()
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["1proc", "2proc_ddp"])
def test_sigkill_then_auto_resume_reproduces_every_step_loss_bitwise(tmp_path: Path, devices: int) -> None:
    reference = _reference(tmp_path, devices)
    run_dir = _interrupted(tmp_path, devices, at_step=7, how=signal.SIGKILL)
    for rank in range(devices):
        reference_rank = reference if rank == 0 else final_losses(tmp_path / "reference/run" / f"losses_rank{rank}.txt")
        assert final_losses(run_dir / f"losses_rank{rank}.txt") == reference_rank
    entries = read_manifest(run_dir / "checkpoints")
    assert [entry["step"] for entry in entries if "step" in entry["name"]] == [8, 10]  # keep_last_k=2
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == MAX_STEPS
    assert len(final["rng_states"]) == devices
    assert any(key.startswith("NonFiniteGuard") for key in final["callbacks"]), "callback state is not saved"


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["1proc", "2proc_ddp"])
def test_requeue_signal_saves_at_the_next_step_and_exits_cleanly(tmp_path: Path, devices: int) -> None:
    reference = _reference(tmp_path, devices)
    run_dir = _interrupted(tmp_path, devices, at_step=5, how=signal.SIGUSR1)
    log = (tmp_path / "interrupted.log").read_text()
    assert "not inside a Slurm job: nothing to requeue" in log
    assert final_losses(run_dir / "losses_rank0.txt") == reference


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["1proc", "2proc_ddp"])
def test_sigkill_mid_mixture_then_auto_resume_reproduces_every_step_loss_bitwise(tmp_path: Path, devices: int) -> None:
    """Two weighted sources (the small one repeats), document masking and restarted positions."""
    reference = _reference(tmp_path, devices, mixture=True)
    run_dir = _interrupted(tmp_path, devices, at_step=7, how=signal.SIGKILL, mixture=True)
    for rank in range(devices):
        reference_rank = final_losses(tmp_path / "reference/run" / f"losses_rank{rank}.txt")
        assert final_losses(run_dir / f"losses_rank{rank}.txt") == reference_rank
    assert reference == final_losses(tmp_path / "reference/run/losses_rank0.txt")
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    sources = final["PretrainDataModule"]["mixture"]["sources"]
    assert [source["name"] for source in sources] == ["plays", "psalms"]
    assert sum(source["consumed"] for source in sources) == MAX_STEPS * 2 * devices
    assert sources[1]["epoch"] >= 1, "the small source never repeated; the test would not cover its epochs"
