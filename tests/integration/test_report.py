"""`sdmoe-train report`: a recipe run with the monitoring callbacks becomes a self-contained HTML dashboard."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from sdmoe_train.cli import main
from tests.integration.test_cli import _write_recipe

MONITORS = [
    {"class_path": "sdmoe_train.lightning.callbacks.RoutingHealthMonitor", "init_args": {"every_n_steps": 2}},
    {"class_path": "sdmoe_train.lightning.callbacks.SpectralOverlapMonitor", "init_args": {"every_n_steps": 2}},
    {
        "class_path": "sdmoe_train.lightning.callbacks.GradientAlignmentMonitor",
        "init_args": {"every_n_steps": 2, "window": 2},
    },
    {"class_path": "sdmoe_train.lightning.callbacks.GateAlignmentMonitor", "init_args": {"every_n_steps": 2}},
]


def test_report_draws_curves_and_latest_heatmaps_of_a_recipe_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe_path = _write_recipe(tmp_path, max_steps=4)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["trainer"]["callbacks"] += MONITORS
    recipe["model"]["sdmoe"] = {"enabled": True, "rank": 4}
    recipe_path.write_text(yaml.safe_dump(recipe))
    main(["prepare", "--config", str(recipe_path)])
    main(["fit", "--config", str(recipe_path)])
    run_dir = tmp_path / "run"
    main(["report", str(run_dir), str(run_dir), "--labels", "first", "second", "--out", str(tmp_path / "r.html")])
    assert f"wrote {tmp_path / 'r.html'}" in capsys.readouterr().out

    page = (tmp_path / "r.html").read_text()
    for title in ("training loss", "validation loss", "unique W_u[i] overlap", "gradient alignment", "load entropy"):
        assert title in page, title
    assert "first: spectral/unique_gate/layer_01 (step 4)" in page
    assert "second: gate/hidden_alignment/layer_00 (step 4)" in page
    assert "routing/load_fraction/layer_01" in page
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) > 20
    for svg in svgs:
        ET.fromstring(svg)  # every chart is well-formed SVG
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")

    main(["report", str(run_dir)])
    assert (run_dir / "report.html").is_file()


def test_report_of_a_directory_without_metrics_says_how_to_log_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no metrics.csv" in capsys.readouterr().err
