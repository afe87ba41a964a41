"""King James corpus preparer: verse references stripped, one document per chapter, idempotent; runs on
generated ``bible -f`` output, so the tests need no ``bible`` program."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sdmoe_train.cli import main
from sdmoe_train.data import kjv_corpus
from sdmoe_train.data.kjv_corpus import install_kjv_corpus, parse_chapters

BIBLE_OUTPUT = """\
Ge1:1 In the beginning God created the heaven and the earth.
Ge1:2 And the earth was without form, and void.
Ge2:1 Thus the heavens and the earth were finished.
Exo1:1 Now these are the names of the children of Israel.
1Sm1:1 Now there was a certain man of Ramathaimzophim.
1Sm1:2 And he had two wives.
Psa119:1 Blessed are the undefiled in the way.
"""


def test_chapters_are_documents_without_verse_references() -> None:
    chapters = parse_chapters(BIBLE_OUTPUT.splitlines())
    assert [chapter.file_name for chapter in chapters] == [
        "01-Ge-001.txt",
        "01-Ge-002.txt",
        "02-Exo-001.txt",
        "03-1Sm-001.txt",
        "04-Psa-119.txt",
    ]
    assert chapters[0].text == (
        "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.\n"
    )
    assert chapters[3].verses == ["Now there was a certain man of Ramathaimzophim.", "And he had two wives."]


def test_a_line_that_is_not_a_verse_is_reported() -> None:
    with pytest.raises(ValueError, match=r"line 2 is not a verse .*'garbage here'"):
        parse_chapters(["Ge1:1 In the beginning.", "garbage here"])


def test_install_writes_one_file_per_chapter_and_keeps_identical_files(tmp_path: Path) -> None:
    files = install_kjv_corpus(tmp_path, BIBLE_OUTPUT)
    assert [file.name for file in files] == sorted(path.name for path in tmp_path.iterdir())
    mtimes = {file: file.stat().st_mtime_ns for file in files}
    files[1].write_text("damaged")
    assert install_kjv_corpus(tmp_path, BIBLE_OUTPUT) == files
    assert files[1].read_text() == "Thus the heavens and the earth were finished.\n"
    assert all(file.stat().st_mtime_ns == mtimes[file] for file in files if file != files[1])


def test_missing_bible_program_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv"):
        install_kjv_corpus(tmp_path)


@pytest.mark.skipif(shutil.which("bible") is None, reason="needs Debian's bible-kjv package")
def test_the_whole_bible_has_1189_chapters_and_31102_verses() -> None:
    chapters = parse_chapters(kjv_corpus.bible_text().splitlines())
    assert len(chapters) == 1189 and sum(len(chapter.verses) for chapter in chapters) == 31102
    assert chapters[-1].file_name == "66-Rev-022.txt"


def test_the_subcommand_writes_the_chapters_and_reports_a_missing_program(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kjv_corpus, "bible_text", lambda: BIBLE_OUTPUT)
    main(["kjv-corpus", str(tmp_path / "kjv")])
    assert capsys.readouterr().out.startswith(f"5 chapters (0.0 MB) in {tmp_path / 'kjv'}")
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        main(["kjv-corpus", str(tmp_path / "elsewhere")])
    assert exit_info.value.code == 2
    assert "apt-get install bible-kjv" in capsys.readouterr().err
