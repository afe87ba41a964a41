"""MoEDeepSpeedStrategy on 2 CPU processes (gloo): ZeRO-1/2 with expert parallelism train, resume, consolidate
and reshard; per-expert weights land where they belong. Needs the ``deepspeed`` extra."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdmoe_train.checkpointing.consolidate import consolidate_checkpoint
from sdmoe_train.checkpointing.manifest import MANIFEST_FILE, checkpoint_problem, read_manifest
from sdmoe_train.checkpointing.model_state import model_state
from sdmoe_train.checkpointing.recovery import recover_checkpoint_directory
from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.parallel.expert_parallel import shard_expert_state
from sdmoe_train.parallel.rank_files import LAYOUT_KEY, rank_file
from tests.integration import deepspeed_runs

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]


def _launch(out_dir: Path, *args: str) -> Path:
    # PYTHONPATH: both ranks import this checkout's sdmoe_train; Lightning re-launches the script for rank 1.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, deepspeed_runs.__file__, str(out_dir), *args]
    subprocess.run(command, check=True, cwd=ROOT, env=env, timeout=300)
    return out_dir


def _ranks(directory: Path) -> list[dict]:
    return [torch.load(rank_file(directory, rank), weights_only=False) for rank in range(2)]


def _assert_replicas_agree(directory: Path) -> None:
    """Everything but the expert slices (router, selection bias, W_c, bases) is identical on both ranks."""
    first, second = _ranks(directory)
    sharded = set(first[LAYOUT_KEY]["sharded"])
    assert sharded, "no expert-sharded parameters recorded"
    for name, tensor in first["state_dict"].items():
        if name not in sharded:
            assert torch.equal(tensor, second["state_dict"][name]), name


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        # Singular vectors of nearly tied singular values round differently in other reduction orders.
        tolerance = 1e-4 if name.endswith("_basis") else atol
        torch.testing.assert_close(actual[name].to(tensor.dtype), tensor, atol=tolerance, rtol=0, msg=name)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same steps on whole global batches, one process, no DeepSpeed."""
    return _launch(tmp_path_factory.mktemp("single"), "--devices", "1", "--steps", "3", "--sdmoe")


@pytest.fixture(scope="module")
def zero2_expert_parallel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zero2_ep2")
    return _launch(out, "--stage", "2", "--ep_size", "2", "--steps", "3", "--sdmoe")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_expert_parallel_sdmoe_run_equals_the_single_device_run(
    stage: int, single_device: Path, zero2_expert_parallel: Path, tmp_path: Path
) -> None:
    if stage == 2:
        run = zero2_expert_parallel
    else:
        run = _launch(tmp_path, "--stage", str(stage), "--ep_size", "2", "--steps", "3", "--sdmoe")
    _assert_replicas_agree(run / "final")
    consolidated = model_state(consolidate_checkpoint(run / "final"))
    expected = torch.load(single_device / "single_device_state.pt")
    _assert_close(consolidated, expected, atol=1e-5)
    assert any(tensor.abs().max() > 0 for name, tensor in expected.items() if name.endswith("selection_bias"))
    for rank in range(2):
        for moment in ("start", "end"):
            logits = torch.load(run / f"{moment}_logits_rank{rank}.pt")
            torch.testing.assert_close(
                logits, torch.load(single_device / f"{moment}_logits_rank0.pt"), atol=1e-5, rtol=0
            )


def test_checkpoint_written_at_ep_size_2_loads_at_ep_size_1_with_identical_logits(zero2_expert_parallel, tmp_path):
    consolidated = tmp_path / "consolidated.ckpt"
    torch.save(consolidate_checkpoint(zero2_expert_parallel / "final"), consolidated)
    module = PretrainModule.load_from_checkpoint(consolidated)
    assert module.parallel.ep_size == 1
    with torch.no_grad():
        logits = module.eval()(deepspeed_runs.evaluation_tokens())
    torch.testing.assert_close(logits, torch.load(zero2_expert_parallel / "end_logits_rank0.pt"), atol=1e-6, rtol=0)


def test_a_directory_written_by_the_strategy_but_not_recorded_is_adopted_and_verifies(zero2_expert_parallel, tmp_path):
    """The adoption check of start-up recovery accepts what the strategy really writes, and only that."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    unrecorded = shutil.copytree(zero2_expert_parallel / "final", checkpoints / "epoch=0-step=3.ckpt")
    recover_checkpoint_directory(checkpoints, keep_last_k=2)
    (entry,) = read_manifest(checkpoints)
    assert (entry["name"], entry["step"]) == (unrecorded.name, 3)
    assert checkpoint_problem(unrecorded) is None
    rank_file(unrecorded, 1).unlink()  # the same directory without one rank's file is not adopted
    (checkpoints / MANIFEST_FILE).unlink()
    with pytest.raises(ConfigError, match="cannot be verified"):
        recover_checkpoint_directory(checkpoints, keep_last_k=2)


def test_checkpoint_written_at_ep_size_1_starts_an_ep_size_2_run_with_identical_logits(single_device: Path, tmp_path):
    out = _launch(
        tmp_path,
        "--stage",
        "2",
        "--ep_size",
        "2",
        "--steps",
        "1",
        "--sdmoe",
        "--init_from",
        str(single_device / "final"),
    )
    expected = torch.load(single_device / "end_logits_rank0.pt")
    for rank in range(2):
        torch.testing.assert_close(torch.load(out / f"start_logits_rank{rank}.pt"), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_expert_parallel_run_resumes_exactly_where_it_stopped(stage: int, tmp_path: Path) -> None:
    common = ["--stage", str(stage), "--ep_size", "2", "--sdmoe", "--one_batch"]
    straight = _launch(tmp_path / "straight", *common, "--steps", "5")
    first = _launch(tmp_path / "first", *common, "--steps", "3")
    resumed = _launch(tmp_path / "resumed", *common, "--steps", "5", "--resume", str(first / "final"))
    for rank in range(2):
        expected = torch.load(rank_file(straight / "final", rank), weights_only=False)
        actual = torch.load(rank_file(resumed / "final", rank), weights_only=False)
        _assert_close(actual["state_dict"], expected["state_dict"], atol=1e-6)
        assert actual["global_step"] == expected["global_step"] == 5
    start = torch.load(first / "end_logits_rank0.pt")
    assert not torch.allclose(torch.load(straight / "end_logits_rank0.pt"), start)


def test_every_expert_weight_round_trips_through_sharding_and_consolidation(tmp_path: Path) -> None:
    out = _launch(tmp_path, "--stage", "2", "--ep_size", "2", "--steps", "1", "--plant")
    files = _ranks(out / "start")
    sharded = files[0][LAYOUT_KEY]["sharded"]
    consolidated = consolidate_checkpoint(out / "start")["state_dict"]
    planted_banks = 0
    for name in sharded:
        layer = int(name.split(".blocks.")[1].split(".")[0])
        matrix = ("gate_proj", "up_proj", "down_proj").index(name.rsplit(".", 1)[1])
        full = consolidated[name]
        for expert in range(full.shape[0]):
            assert torch.all(full[expert] == deepspeed_runs.planted_value(layer, matrix, expert)), (name, expert)
        for ep_rank, file in enumerate(files):
            local = shard_expert_state(consolidated, sharded, ep_rank, ep_size=2)[name]
            assert torch.equal(file["state_dict"][name], local), (name, ep_rank)
        planted_banks += 1
    assert planted_banks == 2 * 3
    torch.save(consolidate_checkpoint(out / "start"), tmp_path / "consolidated.ckpt")
    module = PretrainModule.load_from_checkpoint(tmp_path / "consolidated.ckpt").eval()
    with torch.no_grad():
        logits = module(deepspeed_runs.evaluation_tokens())
    torch.testing.assert_close(logits, torch.load(out / "start_logits_rank0.pt"), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("ep_size", "message"),
    [("2", "model.parallel.ep_size=2 needs ZeRO stage 0, 1 or 2"), ("1", "ZeRO stage 3 does not train this model")],
)
def test_zero3_is_refused_with_a_config_error(tmp_path: Path, ep_size: str, message: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, deepspeed_runs.__file__, str(tmp_path), "--stage", "3", "--ep_size", ep_size]
    result = subprocess.run(command, cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"ConfigError: {message}" in result.stderr
