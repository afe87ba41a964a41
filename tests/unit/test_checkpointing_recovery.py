"""Start-up recovery of a checkpoint directory and the checkpoint ``fit`` resumes from (auto or ``last``)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdmoe_train.checkpointing.manifest import MANIFEST_FILE, read_manifest, record_checkpoint
from sdmoe_train.checkpointing.periodic import PeriodicCheckpoint
from sdmoe_train.checkpointing.recovery import recover_checkpoint_directory
from sdmoe_train.checkpointing.resume import resolve_resume_checkpoint, verify_explicit_checkpoint
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import atomic_path
from sdmoe_train.parallel.rank_files import LAYOUT_KEY, rank_file


def _publish(directory: Path, step: int, name: str | None = None, record: bool = True, **kwargs: object) -> Path:
    path = directory / (name or f"step={step}.ckpt")
    with atomic_path(path) as temp:
        torch.save({"global_step": step, "weights": torch.full((64,), float(step))}, temp)
    if record:
        record_checkpoint(path, step, **kwargs)
    return path


def _publish_sharded(directory: Path, step: int, record: bool = True, world_size: int = 2, **kwargs: object) -> Path:
    """A MoEDeepSpeedStrategy checkpoint: a directory with one file per rank, each recording the layout."""
    path = directory / f"step={step}.ckpt"
    with atomic_path(path, directory=True) as temp:
        for rank in range(world_size):
            layout = {"world_size": world_size, "global_rank": rank, "ep_size": world_size, "ep_rank": rank}
            payload = {"global_step": step, "state_dict": {"w": torch.full((64,), float(rank))}, LAYOUT_KEY: layout}
            torch.save(payload, rank_file(temp, rank))
    if record:
        record_checkpoint(path, step, **kwargs)
    return path


def _trainer(dirpath: Path) -> SimpleNamespace:
    return SimpleNamespace(checkpoint_callbacks=[PeriodicCheckpoint(dirpath=str(dirpath))])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_lost_manifest_is_rebuilt_from_the_checkpoints_that_verify(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (3, 6):
        _publish(tmp_path, step)
    _publish(tmp_path, 6, name="last.ckpt")
    (tmp_path / MANIFEST_FILE).unlink()
    damaged = _publish(tmp_path, 9, record=False)
    damaged.write_bytes(damaged.read_bytes()[:200])
    # Every rank decides from the disk alone, before rank 0 has rewritten anything.
    assert resolve_resume_checkpoint(_trainer(tmp_path), None, auto_resume=True) in (
        str(tmp_path / "step=6.ckpt"),
        str(tmp_path / "last.ckpt"),
    )
    with caplog.at_level(logging.WARNING):
        recover_checkpoint_directory(tmp_path)
    assert f"{MANIFEST_FILE} was missing" in caplog.text and "leaving" not in caplog.text
    assert sorted((entry["name"], entry["step"]) for entry in read_manifest(tmp_path)) == [
        ("last.ckpt", 6),
        ("step=3.ckpt", 3),
        ("step=6.ckpt", 6),
    ]
    assert damaged.is_file(), "a damaged file is never adopted nor deleted"


def test_checkpoints_that_cannot_be_verified_without_a_manifest_refuse_instead_of_restarting(tmp_path: Path) -> None:
    shards = tmp_path / "step=4.ckpt"
    shards.mkdir()
    (shards / "mp_rank_00_model_states.pt").write_bytes(b"sharded strategy output")
    with pytest.raises(
        ConfigError, match=r"holds checkpoints \(step=4\.ckpt\) but no manifest.json entry.*--ckpt_path"
    ):
        resolve_resume_checkpoint(_trainer(tmp_path), None, auto_resume=True)
    with pytest.raises(ConfigError, match="--ckpt_path PATH"):
        recover_checkpoint_directory(tmp_path)


@pytest.mark.parametrize("publish", [_publish, _publish_sharded], ids=["file", "sharded_directory"])
def test_a_save_killed_before_it_was_recorded_is_adopted_and_pruned_and_temporaries_go(
    tmp_path: Path, publish: Callable[..., Path]
) -> None:
    for step in (2, 4, 6):
        publish(tmp_path, step, keep_last_k=3)
    for step in (8, 10):  # renamed into place, killed before the manifest was written
        publish(tmp_path, step, record=False)
    (tmp_path / f".{MANIFEST_FILE}.abc123.tmp").write_text("{half a manif")
    (tmp_path / ".step=12.ckpt.partial").write_bytes(b"partial")
    assert resolve_resume_checkpoint(_trainer(tmp_path), None, auto_resume=True) == str(tmp_path / "step=10.ckpt")
    recover_checkpoint_directory(tmp_path, keep_last_k=3)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        MANIFEST_FILE,
        "step=10.ckpt",
        "step=6.ckpt",
        "step=8.ckpt",
    ]
    assert [entry["step"] for entry in read_manifest(tmp_path)] == [6, 8, 10]


def test_ckpt_path_last_is_the_newest_checkpoint_and_must_verify(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    with pytest.raises(ConfigError, match=r"ckpt_path='last': no checkpoint found in .*leave ckpt_path unset"):
        resolve_resume_checkpoint(trainer, "last", auto_resume=True)
    _publish(tmp_path, 3)
    last = _publish(tmp_path, 3, name="last.ckpt")
    assert resolve_resume_checkpoint(trainer, "last", auto_resume=True) == str(last)
    _flip_byte(last)
    with pytest.raises(ConfigError, match=r"last\.ckpt does not match the SHA-256"):
        resolve_resume_checkpoint(trainer, "last", auto_resume=True)
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"last\.ckpt has 1000 bytes"):
        resolve_resume_checkpoint(trainer, "last", auto_resume=True)
    last.unlink()
    with pytest.raises(ConfigError, match=r"last\.ckpt does not exist"):
        resolve_resume_checkpoint(trainer, "last", auto_resume=True)


@pytest.mark.parametrize("keyword", ["best", "hpc", "registry"])
def test_lightning_keywords_that_name_no_verifiable_checkpoint_are_refused(keyword: str) -> None:
    with pytest.raises(ConfigError, match=rf"ckpt_path='{keyword}' is not supported"):
        verify_explicit_checkpoint(keyword)


def test_a_lost_manifest_is_rebuilt_from_complete_sharded_directories(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (3, 6):
        _publish_sharded(tmp_path, step)
    (tmp_path / MANIFEST_FILE).unlink()
    assert resolve_resume_checkpoint(_trainer(tmp_path), None, auto_resume=True) == str(tmp_path / "step=6.ckpt")
    with caplog.at_level(logging.WARNING):
        recover_checkpoint_directory(tmp_path)
    assert f"{MANIFEST_FILE} was missing" in caplog.text
    assert [entry["step"] for entry in read_manifest(tmp_path)] == [3, 6]


def _lacking_rank_1(path: Path) -> None:
    rank_file(path, 1).unlink()


def _truncated_rank_1(path: Path) -> None:
    rank_file(path, 1).write_bytes(rank_file(path, 1).read_bytes()[:300])


def _rank_1_of_another_step(path: Path) -> None:
    other = _publish_sharded(path.parent, 99, record=False)
    rank_file(other, 1).replace(rank_file(path, 1))
    shutil.rmtree(other)


def _with_a_stray_file(path: Path) -> None:
    (path / "rank_00002.pt").write_bytes(b"")


def _another_strategys_layout(path: Path) -> None:
    for rank in range(2):
        rank_file(path, rank).rename(path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_lacking_rank_1, "lacks rank_00001.pt of the 2 rank files"),
        (_truncated_rank_1, "rank_00001.pt is not a complete torch checkpoint archive"),
        (_rank_1_of_another_step, "rank_00001.pt is not rank 1's file of step 12 (step 99)"),
        (_with_a_stray_file, "holds entries its layout does not name (rank_00002.pt)"),
        (_another_strategys_layout, "without rank_00000.pt (not a MoEDeepSpeedStrategy checkpoint)"),
    ],
)
def test_an_unrecorded_sharded_directory_that_is_not_complete_is_named_and_never_adopted_nor_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, problem: str
) -> None:
    for step in (2, 4):
        _publish_sharded(tmp_path, step, keep_last_k=2)
    damaged = _publish_sharded(tmp_path, 12, record=False)
    damage(damaged)
    files_before = sorted(path.name for path in damaged.iterdir())
    assert resolve_resume_checkpoint(_trainer(tmp_path), None, auto_resume=True) == str(tmp_path / "step=4.ckpt")
    with caplog.at_level(logging.WARNING):
        recover_checkpoint_directory(tmp_path, keep_last_k=1)
    assert f"not adopting {damaged} into {MANIFEST_FILE}" in caplog.text and problem in caplog.text
    assert sorted(path.name for path in damaged.iterdir()) == files_before, "a checkpoint it cannot verify was touched"
    assert [entry["step"] for entry in read_manifest(tmp_path)] == [2, 4]
