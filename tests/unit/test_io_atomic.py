"""Atomic writes: the data and the rename reach the disk (fsync), and a failed write leaves the old file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdmoe_train.io import atomic_path, write_text_atomically


def test_an_atomic_write_fsyncs_the_file_and_then_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "sub" / "manifest.json"
    write_text_atomically(target, "{}")
    # The temporary file's data before the rename (else the rename may publish an empty file after a
    # power cut), then the directory so that the rename itself is durable.
    assert len(synced) == 2, synced
    assert synced[0].parent == target.parent and synced[0].name.startswith(".manifest.json.")
    assert synced[1] == target.parent


def test_a_failed_atomic_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.ckpt"
    target.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]
