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


def test_the_new_file_is_renamed_into_place_so_a_reader_of_the_old_one_sees_it_whole(tmp_path: Path) -> None:
    # Writing over the old file in place (a copy instead of a rename) would change what an open reader gets,
    # and a crash in the middle would leave a torn file under the final name.
    target = tmp_path / "manifest.json"
    target.write_text("previous version")
    with target.open() as reader:
        write_text_atomically(target, "new")
        assert reader.read() == "previous version"
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"], "a temporary was left behind"


def test_an_atomic_directory_replaces_the_previous_one_entirely(tmp_path: Path) -> None:
    target = tmp_path / "hf"
    (target / "old").mkdir(parents=True)
    (target / "old" / "shard.bin").write_text("stale")
    with atomic_path(target, directory=True) as temp:
        (temp / "model.bin").write_text("fresh")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["model.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"], "the moved-aside or temporary directory was left behind"
