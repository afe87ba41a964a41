"""The evidence study's evaluate and report stages on planted runs: numbers, table, figures, files touched."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import sdmoe_evidence
from evidence_report import RESUME_MESSAGE, json_safe, late_drop, write_report
from evidence_study import ARMS, Layout, Study
from sdmoe_evidence import evaluate, jobs

STUDY = Study(steps=200)
ARMS_USED = [arm for arm in ARMS if arm.name in ("baseline", "sdmoe", "sdmoe_strict")]
VALIDATION = {
    ("baseline", 1): [(0, 8.0), (49, 6.0), (99, 5.0), (149, 4.5), (199, 4.2)],
    ("baseline", 2): [(0, 8.2), (49, 6.2), (99, 5.2), (149, 4.7), (199, 4.4)],
    ("sdmoe", 1): [(0, 8.0), (49, 5.5), (99, 4.3), (149, 4.0), (199, 3.9)],
}
"""Planted validation curves: the baseline ends at 4.3 on average, SD-MoE reaches 4.3 at step 99."""


def _plant_run(layout: Layout, arm_name: str, seed: int, halted: bool = False) -> Path:
    run_dir = layout.runs_root / arm_name / f"seed_{seed}"
    (run_dir / "logs").mkdir(parents=True)
    rows = ["step,val/loss,train/lm_loss,probe/unique/leakage"]
    for step, loss in VALIDATION[(arm_name, seed)]:
        leakage = 0.01 * step if arm_name != "baseline" else ""
        rows.append(f"{step},{loss},{loss + 0.1},{leakage}")
    (run_dir / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    record = {"returncode": 1 if halted else 0, "halted": halted, "cpu_seconds": 600.0, "wall_seconds": 1200.0}
    (run_dir / "run.json").write_text(json.dumps(record))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"planted")
    return run_dir


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.fixture
def planted(tmp_path: Path) -> Layout:
    """Finished runs in a folder of their own, read by a study whose outputs go elsewhere."""
    layout = Layout(tmp_path / "report", tmp_path / "data", runs_dir=tmp_path / "study" / "runs")
    for arm_name, seed in VALIDATION:
        _plant_run(layout, arm_name, seed)
    return layout


def test_report_summarises_arms_over_seeds_and_writes_only_into_its_own_folder(planted: Layout) -> None:
    before = _snapshot(planted.runs_root.parent)
    summary = write_report(STUDY, planted, ARMS_USED, jobs(STUDY, planted, ARMS_USED, None), {})
    assert _snapshot(planted.runs_root.parent) == before, "the report must only read the runs"

    assert summary["baseline_final_val_loss"] == pytest.approx(4.3)
    baseline = summary["arms"]["baseline"]
    assert baseline["seeds"] == [1, 2]
    assert baseline["measures"]["final_val_loss"]["mean"] == pytest.approx(4.3)
    assert baseline["measures"]["final_val_loss"]["half_range"] == pytest.approx(0.1)
    sdmoe = summary["arms"]["sdmoe"]
    # Reached at the validation after step 99, i.e. after 100 optimizer steps of 8 x 256 tokens.
    assert sdmoe["measures"]["tokens_to_baseline_loss"]["mean"] == pytest.approx(100 * 8 * 256 / 1e6)
    assert sdmoe["measures"]["leakage"]["mean"] == pytest.approx(1.99)
    # Baseline seed 2 ends above the mean target: it never reaches it on its own, and the table says so.
    assert baseline["measures"]["seeds_reaching_baseline_loss"]["mean"] == 1
    assert baseline["measures"]["tokens_to_baseline_loss_mean_curve"]["mean"] == pytest.approx(200 * 8 * 256 / 1e6)
    assert "sdmoe_strict" not in summary["arms"], "an arm without finished runs is left out"

    table = (planted.out_dir / "results.md").read_text()
    assert "| baseline MoE | 1,2 | 4.300 ± 0.100 |" in table
    assert "| 0.41 | 1 |" in table.split("| baseline MoE |")[1].splitlines()[0]
    assert "| SD-MoE k=8 | 1 | 3.900 |" in table
    stored = json.loads((planted.out_dir / "summary.json").read_text(), parse_constant=pytest.fail)
    assert stored["arms"]["sdmoe"]["seeds"] == [1]
    figures = sorted((planted.out_dir / "figures").glob("*.svg"))
    assert len(figures) >= 10
    for figure in figures:
        ET.fromstring(figure.read_text())
    assert "SD-MoE k=8" in (planted.out_dir / "figures" / "val_loss.svg").read_text()


def test_report_marks_halted_and_resumed_seeds_and_refuses_an_empty_study(planted: Layout, tmp_path: Path) -> None:
    VALIDATION[("sdmoe_strict", 1)] = [(0, 8.0), (49, 7.0)]
    try:
        _plant_run(planted, "sdmoe_strict", 1, halted=True)
        resumed_log = planted.runs_root / "sdmoe" / "seed_1" / "train.log"
        resumed_log.write_text(f"...\n{RESUME_MESSAGE} at /x/last.ckpt\n")
        summary = write_report(STUDY, planted, ARMS_USED, jobs(STUDY, planted, ARMS_USED, None), {})
    finally:
        del VALIDATION[("sdmoe_strict", 1)]
    table = (planted.out_dir / "results.md").read_text()
    assert "| SD-MoE strict | 1 (halted: 1) |" in table
    assert "| SD-MoE k=8 | 1 (resumed: 1) |" in table
    # A resumed run's record times only its last attempt: no time is reported for it.
    assert math.isnan(summary["arms"]["sdmoe"]["measures"]["cpu_minutes"]["mean"])
    assert summary["arms"]["baseline"]["measures"]["cpu_minutes"]["mean"] == pytest.approx(10.0)

    empty = Layout(tmp_path / "other", tmp_path / "data")
    with pytest.raises(SystemExit, match="no finished run under"):
        write_report(STUDY, empty, ARMS_USED, jobs(STUDY, empty, ARMS_USED, None), {})


def test_evaluation_runs_each_stage_once_per_finished_checkpoint_and_caches_in_the_output_folder(
    planted: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluated: list[str] = []

    def stage(checkpoints: dict[str, Path], study: Study, layout: Layout) -> dict[str, dict[str, float]]:
        evaluated.extend(checkpoints)
        return {run_id: {"planted/metric": float(len(run_id))} for run_id in checkpoints}

    def other_stage(checkpoints: dict[str, Path], study: Study, layout: Layout) -> dict[str, dict[str, float]]:
        raise AssertionError("a stage that was not asked for ran")

    monkeypatch.setattr(sdmoe_evidence, "EVALUATION_STAGES", {"planted": stage, "other": other_stage})
    evaluation = evaluate(STUDY, planted, jobs(STUDY, planted, ARMS_USED, None), ["planted"])
    assert sorted(evaluated) == ["baseline/seed_1", "baseline/seed_2", "sdmoe/seed_1"]
    assert evaluation["planted"]["sdmoe/seed_1"] == {"planted/metric": 12.0}

    VALIDATION[("sdmoe", 2)] = VALIDATION[("sdmoe", 1)]
    try:
        _plant_run(planted, "sdmoe", 2)
    finally:
        del VALIDATION[("sdmoe", 2)]
    before = _snapshot(planted.runs_root.parent)
    evaluated.clear()
    evaluation = evaluate(STUDY, planted, jobs(STUDY, planted, ARMS_USED, None), ["planted"])
    assert evaluated == ["sdmoe/seed_2"], "cached results are not recomputed"
    assert set(evaluation["planted"]) == {"baseline/seed_1", "baseline/seed_2", "sdmoe/seed_1", "sdmoe/seed_2"}
    assert json.loads((planted.out_dir / "evaluation.json").read_text()) == evaluation
    assert "other" not in evaluation
    assert _snapshot(planted.runs_root.parent) == before


def test_json_safe_replaces_every_non_finite_number() -> None:
    value = {"a": [1.0, math.nan, {"b": math.inf}], "c": (2, -math.inf), "d": "text"}
    assert json_safe(value) == {"a": [1.0, None, {"b": None}], "c": [2, None], "d": "text"}


def test_late_drop_is_the_fall_over_the_last_eighth_of_training() -> None:
    curve = [(0, 8.0), (699, 4.0), (749, 3.9), (799, 3.85)]
    assert late_drop(curve, 800) == pytest.approx(0.15)
    assert math.isnan(late_drop([(0, 8.0)], 800))
