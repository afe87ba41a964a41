"""The checkpoint manifest: publish, record, prune, verify and fall back (atomic writes: test_io_atomic.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from sdmoe_train.checkpointing.manifest import (
    MANIFEST_FILE,
    checkpoint_problem,
    newest_valid_checkpoint,
    read_manifest,
    record_checkpoint,
    verify_checkpoint,
)
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import atomic_path


def _save(directory: Path, step: int, keep_last_k: int | None = None, name: str | None = None) -> Path:
    path = directory / (name or f"step={step}.ckpt")
    with atomic_path(path) as temp:
        torch.save({"global_step": step, "weights": torch.full((64,), float(step))}, temp)
    record_checkpoint(path, step, keep_last_k=keep_last_k)
    return path


def test_manifest_records_sizes_and_hashes_and_keeps_the_last_k(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep_last_k=2)
    _save(tmp_path, 8, keep_last_k=2, name="last.ckpt")
    entries = read_manifest(tmp_path)
    assert [(entry["name"], entry["step"]) for entry in entries] == [
        ("step=6.ckpt", 6),
        ("step=8.ckpt", 8),
        ("last.ckpt", 8),
    ]
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step=6.ckpt", "step=8.ckpt"]
    file_entry = entries[0]["files"]["."]
    assert file_entry["size"] == (tmp_path / "step=6.ckpt").stat().st_size and len(file_entry["sha256"]) == 64


def test_auto_resume_falls_back_past_a_corrupt_newest_checkpoint_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    data = bytearray(newest.read_bytes())
    data[200] ^= 0xFF
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert newest_valid_checkpoint(tmp_path) == tmp_path / "step=2.ckpt"
    assert "step=4.ckpt" in caplog.text and "SHA-256" in caplog.text


def test_truncated_checkpoint_is_named_in_the_error(tmp_path: Path) -> None:
    path = _save(tmp_path, 2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"step=2\.ckpt has 100 bytes but \d+ were written"):
        verify_checkpoint(path)
    with pytest.raises(ConfigError, match="no checkpoint .* verifies"):
        newest_valid_checkpoint(tmp_path)


def test_checkpoint_outside_any_manifest_is_checked_as_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.ckpt"
    torch.save({"global_step": 1}, path)
    assert checkpoint_problem(path) is None
    path.write_bytes(path.read_bytes()[:-30])
    assert "not a complete torch checkpoint archive" in checkpoint_problem(path)


def test_save_killed_before_it_was_recorded_is_ignored_by_auto_resume(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    # A save that was published but never recorded (killed in between) and a stale partial write.
    torch.save({"global_step": 4}, tmp_path / "step=4.ckpt")
    (tmp_path / ".step=6.ckpt.partial").write_bytes(b"partial")
    assert newest_valid_checkpoint(tmp_path) == tmp_path / "step=2.ckpt"
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["format"] == 1


def test_empty_directory_starts_afresh(tmp_path: Path) -> None:
    assert newest_valid_checkpoint(tmp_path) is None
