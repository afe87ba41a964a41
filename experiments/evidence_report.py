"""The evidence study's results: per-run and per-arm summaries, the markdown tables, the figures.

Reads what the runs logged (``metrics.csv`` of the CSV logger: the monitors' and :mod:`evidence_probe`'s
scalars, validation and training loss), their ``run.json`` records and the evaluation stages' results, and
writes ``summary.json``, ``results.md`` and ``figures/*.svg`` into the study's output directory.

Spreads are over seeds: ``mean ± half-range`` (half of max − min; with two seeds, each seed lies exactly at
one end).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from evidence_runner import Job, read_record
from evidence_study import Arm, Layout, Study
from evidence_svg import Series, grouped_bars, line_chart

from sdmoe_train.errors import ConfigError
from sdmoe_train.io import write_json_atomically, write_text_atomically
from sdmoe_train.report.dashboard import read_run

NAN = float("nan")
RESUME_MESSAGE = "Restored all states from the checkpoint"
"""What Lightning prints when ``sdmoe-train fit`` resumes a run from its checkpoint."""
REFRESH_WINDOW = 0.25
"""Refresh-cycle measurements are averaged over the last quarter of training (they vary per refresh)."""


@dataclass
class RunResult:
    """What one (arm, seed) run produced."""

    arm: Arm
    seed: int
    record: dict
    scalars: dict[str, list[tuple[float, float]]]
    evaluation: dict[str, float]
    resumed: bool = False
    """Trained in more than one attempt: its record's wall and CPU time cover the last attempt only."""

    @property
    def decoupled(self) -> bool:
        return self.arm.sdmoe is not None

    @property
    def specialised_part(self) -> str:
        """The expert parameters that are meant to differ: W_u under SD-MoE, the whole expert otherwise."""
        return "unique" if self.decoupled else "proxy"

    def last(self, metric: str) -> float:
        points = self.scalars.get(metric)
        return points[-1][1] if points else NAN

    def late_mean(self, metric: str, steps: int) -> float:
        points = [value for step, value in self.scalars.get(metric, []) if step >= (1 - REFRESH_WINDOW) * steps]
        return sum(points) / len(points) if points else NAN


def validation_curve(run: RunResult, tokens_per_step: int) -> list[tuple[float, float]]:
    """(training tokens, validation loss); Lightning logs the validation after optimizer step s at step s − 1."""
    return [
        ((0 if step == 0 else step + 1) * tokens_per_step, value) for step, value in run.scalars.get("val/loss", [])
    ]


def first_crossing(curve: list[tuple[float, float]], target: float) -> float:
    """Tokens at which a loss curve first reaches ``target`` (linear between points); NaN if it never does."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if y1 <= target:
            return x1 if y0 == y1 or y0 <= target else x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    return NAN


def late_drop(points: list[tuple[float, float]], steps: int) -> float:
    """How much a curve fell from its first point in the last eighth of training to its last point."""
    late = [value for step, value in points if step >= 7 * steps / 8 - 1]
    return late[0] - late[-1] if late else NAN


def chance_levels(study: Study, rank: int = 8) -> dict[str, float]:
    """Expected values for unrelated random matrices of the study's shapes (exact for uniformly random subspaces).

    ``sim`` of two random r-dimensional subspaces of R^m is r/m in expectation; unique parts live in the
    (m − k)-dimensional complement of the common subspace, where it is r/(m − k). A random matrix has
    ``1 − (1 − k/M)(1 − k/N)`` of its energy touching a fixed (k, k) pair of subspaces.
    """
    width, expert_width = study.arch["hidden_dim"], study.arch["moe"]["expert_hidden_dim"]
    levels = {
        "overlap_d": rank / width,
        "overlap_f": rank / expert_width,
        "overlap_mean": (rank / width + rank / expert_width) / 2,
    }
    for k in (8, 32):
        levels[f"unique_k{k}_overlap_d"] = rank / (width - k)
        levels[f"unique_k{k}_overlap_f"] = rank / (expert_width - k)
        levels[f"unique_k{k}_overlap_mean"] = (rank / (width - k) + rank / (expert_width - k)) / 2
        levels[f"touching_share_k{k}"] = 1 - (1 - k / width) * (1 - k / expert_width)
    return levels


RUN_MEASURES: dict[str, tuple[str, Callable[[RunResult, int], float]]] = {
    "final_val_loss": ("final validation loss", lambda r, s: r.last("val/loss")),
    "late_val_loss_drop": (
        "fall of the validation loss over the last eighth of training (still learning?)",
        lambda r, s: late_drop(r.scalars.get("val/loss", []), s),
    ),
    "heldout_ppl_all": ("held-out perplexity, both corpora", lambda r, s: r.evaluation.get("heldout_ppl/all", NAN)),
    "heldout_ppl_kjv": ("held-out perplexity, KJV", lambda r, s: r.evaluation.get("heldout_ppl/kjv", NAN)),
    "heldout_ppl_shakespeare": (
        "held-out perplexity, Shakespeare",
        lambda r, s: r.evaluation.get("heldout_ppl/shakespeare", NAN),
    ),
    "specialised_overlap": (
        "expert overlap r=8 (monitor: mean of both sides; W_u under SD-MoE)",
        lambda r, s: r.last(f"spectral/{r.specialised_part}_overlap_mean"),
    ),
    "specialised_overlap_d": (
        "expert overlap r=8, model-width side",
        lambda r, s: r.last(f"probe/{r.specialised_part}/overlap_r8_d"),
    ),
    "specialised_overlap_f": (
        "expert overlap r=8, expert-width side",
        lambda r, s: r.last(f"probe/{r.specialised_part}/overlap_r8_f"),
    ),
    "proxy_overlap": ("proxy overlap r=8 (W_c + W_u)", lambda r, s: r.last("spectral/proxy_overlap_mean")),
    "mean_residual_overlap_k8_d": (
        "overlap after removing the top-8 directions of the experts' mean, model side",
        lambda r, s: r.last(f"probe/{r.specialised_part}/residual_overlap_k8_d"),
    ),
    "subspace_residual_overlap_k8_d": (
        "final overlap after removing the 8 directions the experts use most, model side",
        lambda r, s: r.evaluation.get(f"structure/{r.specialised_part}/subspace_residual_overlap_k8_d", NAN),
    ),
    "subspace_residual_overlap_k32_d": (
        "final overlap after removing the 32 directions the experts use most, model side",
        lambda r, s: r.evaluation.get(f"structure/{r.specialised_part}/subspace_residual_overlap_k32_d", NAN),
    ),
    "subspace_energy_top8": (
        "share of the experts' energy touching the 8 directions they use most",
        lambda r, s: r.evaluation.get(f"structure/{r.specialised_part}/subspace_energy_top8", NAN),
    ),
    "common_mode_share": (
        "common-mode share ‖mean‖²/mean‖X_i‖²",
        lambda r, s: r.last(f"probe/{r.specialised_part}/common_mode_share"),
    ),
    "gradient_alignment": ("gradient alignment r=8", lambda r, s: r.last("gradient/alignment_mean")),
    "common_energy": ("gradient energy in the common subspace", lambda r, s: r.last("gradient/common_energy_share")),
    "gate_experts_top1": ("gate top-direction share (expert inputs)", lambda r, s: r.last("gate/experts_top1_share")),
    "gate_hidden_top1": ("gate top-direction share (hidden states)", lambda r, s: r.last("gate/hidden_top1_share")),
    "gate_hidden_captured": (
        "router rows' energy in the top-8 hidden-state directions",
        lambda r, s: r.last("gate/hidden_captured"),
    ),
    "load_entropy": ("load entropy / log E", lambda r, s: r.last("routing/load_entropy")),
    "leakage": ("share of ‖W_u‖² touching the common subspace", lambda r, s: r.last("probe/unique/leakage")),
    "complement_overlap_d": (
        "W_u overlap r=8 with the leaked part removed, model side",
        lambda r, s: r.last("probe/unique/complement_overlap_d"),
    ),
    "leakage_pre_refresh": (
        "leakage before a refresh",
        lambda r, s: r.late_mean("probe/refresh/leakage_pre_refresh_share", s),
    ),
    "leakage_post_refresh": (
        "leakage after a refresh",
        lambda r, s: r.late_mean("probe/refresh/leakage_post_refresh_share", s),
    ),
    "raw_gradient_share": (
        "raw gradient in the common subspace",
        lambda r, s: r.late_mean("probe/refresh/raw_gradient_share", s),
    ),
    "projected_gradient_share": (
        "projected gradient in the common subspace",
        lambda r, s: r.late_mean("probe/refresh/projected_gradient_share", s),
    ),
    "first_moment_share": ("AdamW first moment in it", lambda r, s: r.late_mean("probe/refresh/first_moment_share", s)),
    "adam_direction_share": (
        "AdamW direction m/(√v+ε) in it",
        lambda r, s: r.late_mean("probe/refresh/adam_direction_share", s),
    ),
    "update_share": ("applied update ΔW_u in it", lambda r, s: r.late_mean("probe/refresh/update_share", s)),
    "basis_kept": (
        "common subspace kept per refresh",
        lambda r, s: (
            (r.late_mean("probe/refresh/basis_kept_left", s) + r.late_mean("probe/refresh/basis_kept_right", s)) / 2
        ),
    ),
    "common_outside_share": (
        "share of ‖W_c‖² outside its own common subspace",
        lambda r, s: r.late_mean("probe/refresh/common_outside_share", s),
    ),
    "nonfinite_skipped": ("optimizer steps skipped as non-finite", lambda r, s: r.last("train/nonfinite_skipped")),
    "max_train_loss_late": (
        "largest training loss in the second half",
        lambda r, s: max((v for step, v in r.scalars.get("train/lm_loss", []) if step >= s / 2), default=NAN),
    ),
    "cpu_minutes": ("CPU minutes", lambda r, s: NAN if r.resumed else r.record.get("cpu_seconds", NAN) / 60),
    "wall_minutes": ("wall minutes", lambda r, s: NAN if r.resumed else r.record.get("wall_seconds", NAN) / 60),
}
"""Per-run measures: key -> (description, function of (run, steps))."""


def load_results(study: Study, layout: Layout, arms: list[Arm], jobs: list[Job], evaluation: dict) -> list[RunResult]:
    """Every finished run of the given jobs, in job order."""
    by_name = {arm.name: arm for arm in arms}
    results = []
    for job in jobs:
        record = read_record(job.run_dir)
        if record is None:
            continue
        arm_name, seed_name = job.run_id.split("/")
        run_evaluation = {k: v for stage in evaluation.values() for k, v in stage.get(job.run_id, {}).items()}
        seed = int(seed_name.removeprefix("seed_"))
        scalars = read_scalars(job.run_dir)
        results.append(RunResult(by_name[arm_name], seed, record, scalars, run_evaluation, was_resumed(job.run_dir)))
    return results


def was_resumed(run_dir: Path) -> bool:
    """Whether the run continued from a checkpoint after an interruption (its log says so)."""
    log = run_dir / "train.log"
    return log.is_file() and RESUME_MESSAGE in log.read_text(errors="replace")


def read_scalars(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Every logged scalar of a run over all its attempts (:func:`read_run` joins them); empty if it never logged."""
    try:
        return read_run(run_dir).scalars
    except ConfigError:
        return {}


def spread(values: list[float]) -> dict[str, float | list[float]]:
    """Mean and half-range of the finite values (NaN when there are none), plus the values themselves."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": NAN, "half_range": NAN, "values": values}
    return {"mean": sum(finite) / len(finite), "half_range": (max(finite) - min(finite)) / 2, "values": values}


def mean_curve(runs: list[RunResult], metric: str, x_of: Callable[[float], float] = float) -> Series:
    """Mean over the seeds that logged each step, with the min-max band.

    A step's mean is over the seeds that logged it; the band shows where seeds disagree.
    """
    per_run = [dict(run.scalars.get(metric, [])) for run in runs]
    steps = sorted(set().union(*(set(points) for points in per_run))) if per_run else []
    points, band = [], []
    for step in steps:
        values = [points_by_step[step] for points_by_step in per_run if step in points_by_step]
        points.append((x_of(step), sum(values) / len(values)))
        band.append((min(values), max(values)))
    return Series(runs[0].arm.label if runs else metric, points, band if len(runs) > 1 else [])


def arm_validation_curve(runs: list[RunResult], tokens_per_step: int) -> Series:
    """Mean validation loss over seeds against training tokens (millions)."""
    return mean_curve(runs, "val/loss", lambda step: (0 if step == 0 else step + 1) * tokens_per_step / 1e6)


def summarise(study: Study, arms: list[Arm], results: list[RunResult]) -> dict:
    """Per-run and per-arm measures, the loss target and the chance levels (the content of summary.json)."""
    by_arm = {arm.name: [run for run in results if run.arm.name == arm.name] for arm in arms}
    runs = {
        f"{run.arm.name}/seed_{run.seed}": {key: fn(run, study.steps) for key, (_, fn) in RUN_MEASURES.items()}
        for run in results
    }
    baseline_runs = by_arm.get("baseline", [])
    baseline_curve = arm_validation_curve(baseline_runs, study.tokens_per_step) if baseline_runs else None
    target = baseline_curve.points[-1][1] if baseline_curve and baseline_curve.points else NAN
    arms_summary = {}
    for arm in arms:
        arm_runs = by_arm[arm.name]
        if not arm_runs:
            continue
        crossing = first_crossing(arm_validation_curve(arm_runs, study.tokens_per_step).points, target)
        for run in arm_runs:
            tokens = first_crossing(validation_curve(run, study.tokens_per_step), target)
            runs[f"{arm.name}/seed_{run.seed}"]["tokens_to_baseline_loss"] = tokens / 1e6
        measures = {
            key: spread([runs[f"{arm.name}/seed_{run.seed}"][key] for run in arm_runs])
            for key in [*RUN_MEASURES, "tokens_to_baseline_loss"]
        }
        # A seed that never reaches the target has no crossing: the per-seed mean alone would hide it.
        reached = [tokens for tokens in measures["tokens_to_baseline_loss"]["values"] if math.isfinite(tokens)]
        measures["tokens_to_baseline_loss_mean_curve"] = {"mean": crossing, "half_range": NAN, "values": [crossing]}
        measures["seeds_reaching_baseline_loss"] = {
            "mean": float(len(reached)),
            "half_range": NAN,
            "values": [len(reached)],
        }
        arms_summary[arm.name] = {
            "label": arm.label,
            "question": arm.question,
            "sdmoe": arm.sdmoe,
            "lr": study.lr * arm.lr_scale,
            "seeds": [run.seed for run in arm_runs],
            "halted_seeds": [run.seed for run in arm_runs if run.record.get("halted")],
            "resumed_seeds": [run.seed for run in arm_runs if run.resumed],
            "tokens_to_baseline_loss_mean_curve_millions": crossing,
            "measures": measures,
        }
    return {
        "study": {**asdict(study), "tokens_per_run": study.steps * study.tokens_per_step},
        "baseline_final_val_loss": target,
        "chance": chance_levels(study),
        "arms": arms_summary,
        "runs": runs,
        "measures": {key: description for key, (description, _) in RUN_MEASURES.items()},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_at_report": os.getloadavg(),
        },
    }


def _cell(measure: dict, digits: int) -> str:
    mean, half = measure["mean"], measure["half_range"]
    if not math.isfinite(mean):
        return "—"
    values = [v for v in measure["values"] if math.isfinite(v)]
    return f"{mean:.{digits}f}" if len(values) < 2 else f"{mean:.{digits}f} ± {half:.{digits}f}"


TABLES: tuple[tuple[str, tuple[tuple[str, str, int], ...], bool], ...] = (
    (
        "Loss, held-out perplexity and training efficiency",
        (
            ("final val loss", "final_val_loss", 3),
            ("held-out ppl (KJV)", "heldout_ppl_kjv", 2),
            ("held-out ppl (Shakespeare)", "heldout_ppl_shakespeare", 2),
            ("held-out ppl (all)", "heldout_ppl_all", 2),
            ("tokens to baseline's final loss, seed-mean curve (M)", "tokens_to_baseline_loss_mean_curve", 2),
            ("seeds reaching it on their own", "seeds_reaching_baseline_loss", 0),
            ("max train loss, 2nd half", "max_train_loss_late", 3),
            ("CPU min/run", "cpu_minutes", 1),
            ("wall min/run", "wall_minutes", 1),
        ),
        False,
    ),
    (
        "Specialisation (last measurement; r = 8; SD-MoE arms: unique parts W_u)",
        (
            ("overlap (monitor)", "specialised_overlap", 3),
            ("overlap, model side", "specialised_overlap_d", 3),
            ("overlap, expert side", "specialised_overlap_f", 3),
            ("left after removing top-8 used directions", "subspace_residual_overlap_k8_d", 3),
            ("left after removing top-32", "subspace_residual_overlap_k32_d", 3),
            ("proxy overlap", "proxy_overlap", 3),
            ("grad alignment", "gradient_alignment", 3),
            ("grad energy in common subspace", "common_energy", 3),
            ("gate top-1 share (experts)", "gate_experts_top1", 3),
            ("gate top-1 share (hidden)", "gate_hidden_top1", 3),
            ("load entropy", "load_entropy", 4),
        ),
        False,
    ),
    (
        "Mechanism (SD-MoE arms; refresh-cycle values averaged over the last quarter of training)",
        (
            ("W_u leakage", "leakage", 3),
            ("leakage before refresh", "leakage_pre_refresh", 3),
            ("leakage after refresh", "leakage_post_refresh", 3),
            ("W_u overlap, leak removed (model side)", "complement_overlap_d", 3),
            ("raw grad share", "raw_gradient_share", 3),
            ("projected grad share", "projected_gradient_share", 4),
            ("Adam m share", "first_moment_share", 3),
            ("Adam m/√v share", "adam_direction_share", 3),
            ("applied ΔW_u share", "update_share", 3),
            ("subspace kept per refresh", "basis_kept", 3),
            ("W_c outside its subspace", "common_outside_share", 3),
        ),
        True,
    ),
)
"""Markdown tables: title, (column header, measure key, digits), whether only SD-MoE arms are listed."""


def markdown_tables(summary: dict) -> str:
    """The results tables in markdown, one row per arm."""
    lines = []
    for title, columns, decoupled_only in TABLES:
        lines += [f"### {title}", "", "| arm | seeds | " + " | ".join(header for header, _, _ in columns) + " |"]
        lines.append("|---|---|" + "---|" * len(columns))
        for arm in summary["arms"].values():
            if decoupled_only and arm["sdmoe"] is None:
                continue
            seeds = ",".join(str(seed) for seed in arm["seeds"])
            if arm["halted_seeds"]:
                seeds += f" (halted: {','.join(str(seed) for seed in arm['halted_seeds'])})"
            if arm["resumed_seeds"]:
                seeds += f" (resumed: {','.join(str(seed) for seed in arm['resumed_seeds'])})"
            cells = [_cell(arm["measures"][key], digits) for _, key, digits in columns]
            lines.append(f"| {arm['label']} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    chance = summary["chance"]
    lines.append(
        f"Chance levels (independent random subspaces): overlap r=8 model side {chance['overlap_d']:.4f}, expert side "
        f"{chance['overlap_f']:.4f}, mean {chance['overlap_mean']:.4f}; unique parts (k=8 complement) "
        f"{chance['unique_k8_overlap_d']:.4f} / {chance['unique_k8_overlap_f']:.4f} / "
        f"{chance['unique_k8_overlap_mean']:.4f}; share of a random matrix touching a k=8 common subspace "
        f"{chance['touching_share_k8']:.4f} (k=32: {chance['touching_share_k32']:.4f})."
    )
    lines.append(
        f"Baseline's final validation loss (mean over seeds): {summary['baseline_final_val_loss']:.4f}; "
        "± is half the range over seeds. The time of a resumed seed (trained in several attempts) is left out."
    )
    return "\n".join(lines) + "\n"


def json_safe(value: object) -> object:
    """The value with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _arm_runs(results: list[RunResult], arms: list[Arm], decoupled_only: bool = False) -> list[list[RunResult]]:
    groups = [[run for run in results if run.arm.name == arm.name] for arm in arms]
    return [group for group in groups if group and (group[0].decoupled or not decoupled_only)]


def _mean_evaluation(runs: list[RunResult], template: str, k: int) -> float:
    values = [run.evaluation.get(template.format(k=k), NAN) for run in runs]
    return sum(values) / len(values) if values else NAN


def _specialised_curve(runs: list[RunResult], quantity: str) -> Series:
    return mean_curve(runs, f"probe/{runs[0].specialised_part}/{quantity}")


def figures(study: Study, arms: list[Arm], results: list[RunResult], summary: dict) -> dict[str, str]:
    """File name -> SVG of every figure of the results page."""
    chance = summary["chance"]
    groups = _arm_runs(results, arms)
    sdmoe_groups = _arm_runs(results, arms, decoupled_only=True)
    one_x = [group for group in groups if group[0].arm.lr_scale == 1.0]
    tokens = "training tokens (millions)"
    target = [("baseline final", summary["baseline_final_val_loss"])]
    curves = [arm_validation_curve(group, study.tokens_per_step) for group in groups]
    late_values = [y for curve in curves for x, y in curve.points if x >= curves[0].points[-1][0] / 2]
    out = {
        "val_loss.svg": line_chart(curves, "validation loss (mean over seeds, band: min-max)", tokens, "loss", target),
        "val_loss_late.svg": line_chart(
            curves,
            "validation loss, second half of training",
            tokens,
            "loss",
            target,
            y_range=(min(late_values), max(late_values)) if late_values else None,
        ),
    }
    lr_groups = [group for group in groups if group[0].arm.name in ("baseline", "sdmoe", "baseline_lr4x", "sdmoe_lr4x")]
    out["train_loss_lr.svg"] = line_chart(
        [mean_curve(group, "train/lm_loss") for group in lr_groups],
        "training loss at 1x and 4x the learning rate",
        "optimizer step",
        "loss",
    )
    side_chance = {"d": chance["overlap_d"], "f": chance["overlap_f"]}
    for side, caption in (("d", "model-width side"), ("f", "expert-width side")):
        out[f"overlap_{side}_side.svg"] = line_chart(
            [_specialised_curve(group, f"overlap_r8_{side}") for group in one_x],
            f"expert overlap r=8, {caption} (SD-MoE: unique parts W_u)",
            "optimizer step",
            "mean sim over expert pairs",
            [("chance", side_chance[side])],
        )
    out["proxy_overlap.svg"] = line_chart(
        [mean_curve(group, "spectral/proxy_overlap_mean") for group in one_x],
        "proxy overlap r=8 (weights the tokens see), mean of both sides",
        "optimizer step",
        "mean sim over expert pairs",
        [("chance", chance["overlap_mean"])],
    )
    ranks = (4, 8, 16, 32)
    rank_series = [
        Series(
            group[0].arm.label,
            [
                (r, sum(run.last(f"probe/{run.specialised_part}/overlap_r{r}_d") for run in group) / len(group))
                for r in ranks
            ],
        )
        for group in one_x
    ]
    rank_series.append(Series("chance r/D", [(r, r / study.arch["hidden_dim"]) for r in ranks], dashed=True))
    out["overlap_vs_rank.svg"] = line_chart(
        rank_series, "final expert overlap against r, model-width side", "r (subspace dimension)", "mean sim"
    )
    out["leakage.svg"] = line_chart(
        [mean_curve(group, "probe/unique/leakage") for group in sdmoe_groups],
        "share of ‖W_u‖² touching the current common subspace",
        "optimizer step",
        "share",
        [("random matrix, k=8", chance["touching_share_k8"]), ("k=32", chance["touching_share_k32"])],
    )
    refresh_series = []
    for group in sdmoe_groups:
        for phase, dashed in (("pre", False), ("post", True)):
            series = mean_curve(group, f"probe/refresh/leakage_{phase}_refresh_share")
            refresh_series.append(Series(f"{group[0].arm.label} ({phase})", series.points, dashed=dashed))
    out["leakage_refresh.svg"] = line_chart(
        refresh_series, "W_u leakage right before and right after each basis refresh", "optimizer step", "share"
    )
    stages = (
        ("raw grad", "raw_gradient_share"),
        ("projected grad", "projected_gradient_share"),
        ("Adam m", "first_moment_share"),
        ("Adam m/√v", "adam_direction_share"),
        ("applied ΔW_u", "update_share"),
    )
    out["update_shares.svg"] = grouped_bars(
        [label for label, _ in stages],
        {
            group[0].arm.label: [summary["arms"][group[0].arm.name]["measures"][key]["mean"] for _, key in stages]
            for group in sdmoe_groups
        },
        "share inside the common subspace along the update path of W_u",
        "share of energy",
        [("random matrix, k=8", chance["touching_share_k8"])],
    )
    removed = (0, 1, 2, 4, 8, 16, 32, 64)
    for name, metric, title, reference in (
        (
            "residual_overlap_vs_k.svg",
            "subspace_residual_overlap_k{k}_d",
            "final overlap r=8 (model side) after removing the k directions the experts use most",
            lambda k: 8 / (study.arch["hidden_dim"] - k),
        ),
        (
            "mean_residual_overlap_vs_k.svg",
            "residual_overlap_k{k}_d",
            "final overlap r=8 (model side) after removing the top-k directions of the experts' mean",
            lambda k: 8 / (study.arch["hidden_dim"] - k),
        ),
        (
            "shared_energy_vs_k.svg",
            "shared_energy_top{k}",
            "share of an expert's energy in the top-k directions of the experts' mean",
            None,
        ),
    ):
        lines = [
            Series(
                group[0].arm.label,
                [
                    (k, value)
                    for k in removed
                    if math.isfinite(
                        value := _mean_evaluation(group, f"structure/{group[0].specialised_part}/{metric}", k)
                    )
                ],
            )
            for group in one_x
        ]
        if reference is not None:
            lines.append(Series("chance r/(D-k)", [(k, reference(k)) for k in removed], dashed=True))
        out[name] = line_chart(lines, title, "k (shared directions removed)", "")
    for name, metric, title in (
        ("gradient_alignment.svg", "gradient/alignment_mean", "gradient-subspace alignment r=8"),
        ("common_energy.svg", "gradient/common_energy_share", "expert-gradient energy in the common subspace"),
        ("gate_alignment.svg", "gate/experts_top1_share", "router rows: top-direction share (expert inputs)"),
        ("load_entropy.svg", "routing/load_entropy", "load entropy / log E"),
    ):
        out[name] = line_chart([mean_curve(group, metric) for group in one_x], title, "optimizer step", "")
    return out


def write_report(study: Study, layout: Layout, arms: list[Arm], jobs: list[Job], evaluation: dict) -> dict:
    """Write ``summary.json``, ``results.md`` and ``figures/`` into the output directory; return the summary."""
    results = load_results(study, layout, arms, jobs, evaluation)
    if not results:
        raise SystemExit(f"no finished run under {layout.runs_root}; run the train stage first")
    summary = summarise(study, arms, results)
    if layout.training_record.is_file():
        summary["training"] = json.loads(layout.training_record.read_text())
    write_json_atomically(layout.out_dir / "summary.json", json_safe(summary))
    write_text_atomically(layout.out_dir / "results.md", markdown_tables(summary))
    figures_dir = layout.out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for name, svg in figures(study, arms, results, summary).items():
        write_text_atomically(figures_dir / name, svg)
    print(markdown_tables(summary))
    return summary
