"""A mixture recipe through `sdmoe-train fit`: per-source metrics in the CSV and the dashboard, and a resume
with changed weights refused unless allowed."""

from __future__ import annotations

import csv
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sdmoe_train.cli import main
from tests.integration.training_runs import write_tiny_recipe

SOURCES = ("plays", "psalms")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step mixture run (the run directory's CSV log) with validation every 2 steps; returns its recipe."""
    root = tmp_path_factory.mktemp("mixture")
    recipe = write_tiny_recipe(root, max_steps=4, mixture=True)
    settings = yaml.safe_load(recipe.read_text())
    settings["trainer"]["val_check_interval"] = 2
    del settings["trainer"]["logger"]  # the default: CSV metrics in the run directory, one folder per attempt
    recipe.write_text(yaml.safe_dump(settings))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["sdmoe-train"])
        main(["fit", "--config", str(recipe)])
    return recipe


def _rows(recipe: Path) -> list[dict[str, str]]:
    with open(recipe.parent / "run" / "logs" / "version_0" / "metrics.csv") as stream:
        return list(csv.DictReader(stream))


def test_tokens_epochs_and_validation_loss_are_logged_per_source(trained: Path) -> None:
    rows = _rows(trained)
    steps = [row for row in rows if row["train/tokens_seen"]]
    last = steps[-1]
    tokens = {name: float(last[f"data/tokens/{name}"]) for name in SOURCES}
    assert sum(tokens.values()) == float(last["train/tokens_seen"]) == 4 * 2 * 32
    assert tokens["plays"] == tokens["psalms"]  # equal weights, 8 examples
    checkpoint = torch.load(trained.parent / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    for source in checkpoint["PretrainDataModule"]["mixture"]["sources"]:
        assert float(last[f"data/epoch/{source['name']}"]) == pytest.approx(4 / source["num_examples"])
    validations = [row for row in rows if row["val/loss/plays"]]
    assert len(validations) == 3  # before training, after steps 2 and 4
    for row in validations:
        per_source = [float(row[f"val/loss/{name}"]) for name in SOURCES]
        assert float(row["val/loss"]) == pytest.approx(sum(per_source) / 2, rel=1e-6)


def test_dashboard_draws_the_mixture(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["report", str(trained.parent / "run")])
    page = (trained.parent / "run" / "report.html").read_text()
    assert "Data mixture" in page
    for title in ("training tokens per source", "epochs per source", "validation loss per source"):
        assert title in page
    assert "all (mixture-weighted)" in page


def _resume_with(trained: Path, tmp_path: Path, weights: tuple[float, float], *extra: str) -> list[str]:
    run = tmp_path / "run"
    shutil.copytree(trained.parent / "run", run)
    settings = yaml.safe_load(trained.read_text().replace(str(trained.parent / "run"), str(run)))
    for source, weight in zip(settings["data"]["corpora"], weights, strict=True):
        source["weight"] = weight
    settings["trainer"]["max_steps"] = 6
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(settings))
    return ["fit", "--config", str(recipe), *extra]


def test_resume_with_changed_weights_is_refused_naming_old_and_new(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_resume_with(trained, tmp_path, (0.8, 0.2)))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error[-2000:]
    assert "data.corpora[plays].weight: checkpoint 0.5 != recipe 0.8" in error
    assert "mixture shares: checkpoint plays 0.5, psalms 0.5 != recipe plays 0.8, psalms 0.2" in error
    assert "data.allow_mixture_change=true" in error


def test_allowed_weight_change_continues_every_source_where_it_was(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = torch.load(trained.parent / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    main(_resume_with(trained, tmp_path, (0.75, 0.25), "--data.allow_mixture_change=true"))
    assert re.search(
        r"validation loss per source after training: plays \d+\.\d{4}, psalms \d+\.\d{4}", capsys.readouterr().out
    )
    after = torch.load(tmp_path / "run" / "checkpoints" / "epoch=0-step=6.ckpt", weights_only=False)
    old, new = (state["PretrainDataModule"]["mixture"]["sources"] for state in (before, after))
    assert after["global_step"] == 6
    # 2 more steps of 2 examples: 3 : 1 from the resume point on.
    assert [source["consumed"] - previous["consumed"] for source, previous in zip(new, old, strict=True)] == [3, 1]
    assert [source["weight"] for source in new] == [0.75, 0.25]
