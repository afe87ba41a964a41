"""Do the monitors see SD-MoE work? Train the tiny Qwen-style baseline and its SD-MoE twin, then compare.

Both arms run their recipe (``recipes/tiny_qwen_cpu.yaml`` and ``recipes/tiny_qwen_cpu_sdmoe.yaml``: same
seed, data, batches and schedule, so the same tokens) for ``--steps`` optimizer steps with every monitoring
callback at ``--every`` steps, one after the other. Then it writes

- ``OUT/comparison.html``: the ``sdmoe-train report`` dashboard of both runs;
- ``OUT/figures/*.svg``: validation loss, unique-part and proxy overlap, gradient alignment and common-subspace
  energy, gate alignment, over time for both arms (the figures of ``docs/monitoring.md``);
- ``OUT/summary.json`` (also ``--out``): the last logged value of each headline metric per arm.

Needs the demo corpus and its token cache (``make demo-corpus`` then ``sdmoe-train prepare --config
recipes/tiny_qwen_cpu.yaml``), run from the repository root:

    python benchmarks/specialisation_evidence.py --steps 300 --out-dir runs/specialisation_evidence
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml
from reporting import environment, write_result

from sdmoe_train.report.dashboard import read_run, write_dashboard
from sdmoe_train.report.svg import heatmap_svg, line_chart_svg

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"baseline": "recipes/tiny_qwen_cpu.yaml", "sdmoe": "recipes/tiny_qwen_cpu_sdmoe.yaml"}
LABELS = {"baseline": "baseline MoE", "sdmoe": "SD-MoE"}
FIGURES = {
    "validation_loss": ("validation loss", "val/loss"),
    "training_loss": ("training loss (LM)", "train/lm_loss"),
    "unique_overlap": ("expert overlap: unique parts W_u (SD-MoE) / proxies (baseline)", None),
    "proxy_overlap": ("expert overlap: proxies W = W_c + W_u", "spectral/proxy_overlap_mean"),
    "gradient_alignment": ("gradient-subspace alignment", "gradient/alignment_mean"),
    "common_energy": ("gradient energy in the common subspace", "gradient/common_energy_share"),
    "gate_alignment": ("gate: top-direction share (probe hidden states)", "gate/hidden_top1_share"),
    "load_entropy": ("load entropy / log E", "routing/load_entropy"),
}
HEATMAPS = {
    "baseline": ["spectral/proxy_up/layer_01", "gate/experts_alignment/layer_01"],
    "sdmoe": ["spectral/unique_up/layer_01", "spectral/proxy_up/layer_01", "gate/experts_alignment/layer_01"],
}
"""Latest-step matrices drawn as separate figures: expert overlap and router-row cosines."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per arm")
    parser.add_argument("--every", type=int, default=20, help="interval of every monitor")
    parser.add_argument("--val-every", type=int, default=50, help="steps between validations")
    parser.add_argument("--val-batches", type=int, default=16, help="validation batches per validation")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/specialisation_evidence"))
    parser.add_argument("--out", type=Path, default=None, help="also write the summary JSON here")
    parser.add_argument(
        "--svd",
        choices=["full", "lowrank"],
        default="full",
        help="factorisation of the overlap and gradient monitors (tiny experts: the exact one is cheap)",
    )
    parser.add_argument("--report-only", action="store_true", help="skip training; rebuild the report from OUT_DIR")
    return parser.parse_args()


def arm_recipe(arm: str, args: argparse.Namespace) -> Path:
    """The arm's recipe with this experiment's steps, intervals and output directory."""
    source = ROOT / ARMS[arm]
    recipe = yaml.safe_load(source.read_text())
    run_dir = (args.out_dir / arm).resolve()
    recipe["model"]["arch"] = str(source.parent / recipe["model"]["arch"])
    trainer = recipe["trainer"]
    trainer.update(max_steps=args.steps, val_check_interval=args.val_every, default_root_dir=str(run_dir))
    trainer.update(enable_progress_bar=False, limit_val_batches=args.val_batches)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("PeriodicCheckpoint"):
            callback["init_args"].update(every_n_train_steps=args.steps)
        else:
            callback["init_args"]["every_n_steps"] = args.every
            if "window" in callback["init_args"]:
                callback["init_args"]["window"] = min(callback["init_args"]["window"], args.every)
            if callback["class_path"].endswith(("SpectralOverlapMonitor", "GradientAlignmentMonitor")):
                callback["init_args"]["svd"] = args.svd
    path = args.out_dir / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(arm: str, args: argparse.Namespace) -> float:
    recipe = arm_recipe(arm, args)
    started = time.perf_counter()
    command = [sys.executable, "-m", "sdmoe_train.cli", "fit", "--config", str(recipe)]
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {} if args.report_only else {arm: train(arm, args) for arm in ARMS}
    run_dirs = [args.out_dir / arm for arm in ARMS]
    dashboard = write_dashboard(run_dirs, args.out_dir / "comparison.html", [LABELS[arm] for arm in ARMS])
    runs = {arm: read_run(args.out_dir / arm, LABELS[arm]) for arm in ARMS}
    figures_dir = args.out_dir / "figures"
    figures_dir.mkdir(exist_ok=True)
    for name, (title, metric) in FIGURES.items():
        series = {}
        for arm, run in runs.items():
            # The baseline has no unique parts: its proxies are what its experts are made of.
            arm_metric = metric or ("spectral/unique_overlap_mean" if arm == "sdmoe" else "spectral/proxy_overlap_mean")
            if arm_metric in run.scalars:
                series[run.label] = run.scalars[arm_metric]
        (figures_dir / f"{name}.svg").write_text(line_chart_svg(series, title, y_label=metric or "overlap"))
    for arm, run in runs.items():
        for name in HEATMAPS[arm]:
            record = run.figures[name]
            title = f"{run.label}: {name} (step {record['step']})"
            svg = heatmap_svg(record["values"], title, record["row_label"], record["column_label"])
            (figures_dir / f"{arm}_{name.replace('/', '_')}.svg").write_text(svg)
    headline = [
        "val/loss",
        "spectral/proxy_overlap_mean",
        "spectral/unique_overlap_mean",
        "gradient/alignment_mean",
        "gradient/common_energy_share",
        "gate/hidden_top1_share",
        "gate/experts_top1_share",
        "routing/load_entropy",
    ]
    final = {
        arm: {metric: run.scalars[metric][-1][1] for metric in headline if metric in run.scalars}
        for arm, run in runs.items()
    }
    result = {
        "benchmark": "specialisation_evidence",
        "steps": args.steps,
        "monitor_every": args.every,
        "tokens_per_arm": args.steps * 8 * 256,
        "train_seconds": {arm: round(value, 1) for arm, value in seconds.items()},
        "final": final,
        "dashboard": str(dashboard),
        **environment(),
    }
    for arm, values in final.items():
        print(f"{LABELS[arm]:>13}: " + ", ".join(f"{metric} {value:.4f}" for metric, value in values.items()))
    write_result(result, args.out_dir / "summary.json")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
