"""`sdmoe-train ssmoe-eval` and `validate --model.ssmoe.*` on a tiny trained checkpoint, end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sdmoe_train.cli import main
from tests.integration.test_cli import _write_recipe


def test_a_checkpoint_is_evaluated_with_ssmoe_off_and_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _write_recipe(tmp_path, max_steps=3)
    main(["prepare", "--config", str(recipe)])
    main(["fit", "--config", str(recipe), "--validate_before_fit", "false"])
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    capsys.readouterr()

    report = tmp_path / "ssmoe.json"
    main(
        ["ssmoe-eval", "--config", str(recipe), "--ckpt_path", str(checkpoint), "--ssmoe.k", "8"]
        + ["--blends", "[0, 0.5, 1]", "--output", str(report)]
    )
    printed = capsys.readouterr().out
    assert "val loss" in printed and "load H/logE" in printed
    rows = json.loads(report.read_text())["rows"]
    assert [row["c"] for row in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["changed_share"] == 0.0 and rows[2]["changed_share"] > 0.0
    assert all(0.0 < row["load_entropy"] <= 1.0 and row["val_loss"] > 0 for row in rows)

    main(["validate", "--config", str(recipe), "--ckpt_path", str(checkpoint)])
    learned = capsys.readouterr().out
    main(
        ["validate", "--config", str(recipe), "--ckpt_path", str(checkpoint)]
        + ["--model.ssmoe.enabled", "true", "--model.ssmoe.c", "0.0", "--model.ssmoe.k", "8"]
    )
    blended_zero = capsys.readouterr().out
    for output in (learned, blended_zero):
        assert "val/loss" in output and "val/load_entropy/layer_01" in output
    # c = 0 through `validate` reproduces the learned router's loss, and ssmoe-eval's c = 0 row.
    assert _printed_metric(learned, "val/loss") == _printed_metric(blended_zero, "val/loss")
    assert _printed_metric(learned, "val/loss") == pytest.approx(rows[0]["val_loss"], rel=1e-5)

    with pytest.raises(SystemExit) as exit_info:
        main(["ssmoe-eval", "--config", str(recipe), "--ckpt_path", str(checkpoint), "--blends", "[0, 2]"])
    assert exit_info.value.code == 2
    assert "ssmoe.c=2.0 must lie in [0, 1]" in capsys.readouterr().err


def _printed_metric(output: str, name: str) -> float:
    """A value from Lightning's validation results table: `│ name │ value │` with rich, `name   value` without."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in re.split(r"[|│]|\s{2,}", line.strip()) if cell.strip()]
        if len(cells) == 2 and cells[0] == name:
            return float(cells[1])
    raise AssertionError(f"{name} not printed in:\n{output}")
