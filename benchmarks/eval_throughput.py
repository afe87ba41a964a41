"""Evaluation throughput: the ``sdmoe`` lm-eval model against lm-eval's own ``hf`` model, same model, same requests.

The model (the demo recipe's architecture, randomly initialised, or ``--ckpt``) is exported with
``sdmoe-train export`` to a transformers Qwen2-MoE directory, which lm-eval's ``hf`` model loads (fp32, CPU).
Both answer the requests of the shipped offline tasks, built once by lm-eval: the multiple-choice
``loglikelihood`` requests of ``shakespeare_last_word`` and ``shakespeare_next_line`` and the
``loglikelihood_rolling`` requests of ``shakespeare_perplexity`` (``--limit`` documents each), plus greedy
``generate_until`` requests (each next-line context, up to ``--max_gen_toks`` tokens or a line break). The two
models run alternately, the first of each pair swapping every repeat, so machine noise hits both alike; the
ratios are of median wall times and of median process CPU times (the latter less disturbed by other jobs
sharing the machine). Tokens per second count every token fed to the model (context and continuation,
after truncation to the context window) for scoring, and the generated tokens for generation.

    python benchmarks/eval_throughput.py --out benchmarks/results/eval_throughput.json

Needs the ``eval`` and ``hf`` extras and the demo tokenizer (``sdmoe-train prepare --config
recipes/tiny_qwen_cpu.yaml``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from reporting import environment, write_result

from sdmoe_train.cli.evaluate import load_evaluation_model
from sdmoe_train.data.tokenizer import load_tokenizer
from sdmoe_train.evaluation.adapter import SDMoELM
from sdmoe_train.evaluation.isolation import evaluation_mode
from sdmoe_train.evaluation.tasks import load_tasks, resolve_tasks
from sdmoe_train.interop.hf.driver import export_model
from sdmoe_train.models import presets
from sdmoe_train.models.transformer import Transformer

WORKLOADS = {
    "last_word": ("shakespeare_last_word", "loglikelihood"),
    "next_line": ("shakespeare_next_line", "loglikelihood"),
    "perplexity": ("shakespeare_perplexity", "loglikelihood_rolling"),
    "generation": ("shakespeare_next_line", "generate_until"),
}
"""Workload -> (task whose requests it runs, model method). The multiple-choice tasks run one at a time:
pooled, lm-eval 0.4.13's hf model mis-scores requests whose context group holds a longer continuation of the
other task (docs/evaluation.md), which would show as a disagreement that is not about speed."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint to measure (default: random demo model)")
    parser.add_argument("--tokenizer", type=Path, default=Path("data/shakespeare-bpe4096.json"))
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_gen_toks", type=int, default=24)
    parser.add_argument("--generations", type=int, default=32, help="generate_until requests")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each model (alternating)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--workloads",
        type=lambda text: text.split(","),
        default=list(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def build_requests(limit: int, generations: int, max_gen_toks: int) -> dict[str, list[Instance]]:
    """Each workload's requests, built by lm-eval from the shipped tasks as an evaluation builds them."""
    loaded = load_tasks(resolve_tasks(["shakespeare"]))["tasks"]
    for task in loaded.values():
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
    requests = {
        workload: list(loaded[task].instances)
        for workload, (task, kind) in WORKLOADS.items()
        if kind != "generate_until"
    }
    contexts = sorted({request.args[0] for request in requests["next_line"]})
    settings = {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    requests["generation"] = [
        Instance(request_type="generate_until", doc={}, arguments=(context, dict(settings)), idx=0)
        for context in contexts[:generations]
    ]
    return requests


def scored_tokens(lm: SDMoELM, kind: str, requests: list[Instance]) -> int:
    """Tokens fed to the model to score the requests (what both models process, before padding)."""
    if kind == "loglikelihood":
        total = 0
        for context, continuation in (request.args for request in requests):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            total += min(len(context_ids) + len(continuation_ids) - 1, lm.max_length)
        return total
    return sum(len(lm.tok_encode(request.args[0])) + 1 for request in requests)


def run_workload(lm: Any, kind: str, requests: list[Instance]) -> tuple[float, float, list[Any]]:
    """Wall seconds, process CPU seconds and the answers of one run of the requests."""
    started, started_cpu = time.perf_counter(), time.process_time()
    with evaluation_mode(lm.model):
        answers = getattr(lm, kind)(requests, disable_tqdm=True)
    return time.perf_counter() - started, time.process_time() - started_cpu, answers


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.ckpt is None:
        torch.manual_seed(0)
        model = Transformer(presets.tiny_qwen_moe()).eval()
    else:
        model = load_evaluation_model(args.ckpt, None, tokenizer)
    with tempfile.TemporaryDirectory() as hf_dir:
        export_model(model, hf_dir, tokenizer=args.tokenizer)
        models = {
            "sdmoe": SDMoELM(model, tokenizer, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks),
            "hf": HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=args.batch_size),
        }
        requests = build_requests(args.limit, args.generations, args.max_gen_toks)
        ours = models["sdmoe"]
        results: dict[str, Any] = {}
        for workload in args.workloads:
            if workload not in WORKLOADS:
                raise SystemExit(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
            kind = WORKLOADS[workload][1]
            times: dict[str, list[float]] = {name: [] for name in models}
            cpu_times: dict[str, list[float]] = {name: [] for name in models}
            answers: dict[str, list[Any]] = {}
            for repeat in range(args.repeats + 1):  # the first round warms both up and is not timed
                order = list(models) if repeat % 2 == 0 else list(reversed(models))
                for name in order:
                    elapsed, cpu, answers[name] = run_workload(models[name], kind, requests[workload])
                    if repeat:
                        times[name].append(elapsed)
                        cpu_times[name].append(cpu)
            if kind == "generate_until":
                tokens = sum(len(ours.tok_encode(text)) for text in answers["sdmoe"])
                agreement = sum(a == b for a, b in zip(answers["sdmoe"], answers["hf"], strict=True))
            else:
                tokens = scored_tokens(ours, kind, requests[workload])
                first = [a if isinstance(a, float) else a[0] for a in answers["sdmoe"]]
                second = [b if isinstance(b, float) else b[0] for b in answers["hf"]]
                agreement = max(abs(a - b) for a, b in zip(first, second, strict=True))
            medians = {name: statistics.median(values) for name, values in times.items()}
            cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
            results[workload] = {
                "requests": len(requests[workload]),
                "tokens": tokens,
                "seconds": times,
                "cpu_seconds": cpu_times,
                "tokens_per_second": {name: tokens / median for name, median in medians.items()},
                "speedup_sdmoe_over_hf": medians["hf"] / medians["sdmoe"],
                "cpu_time_speedup_sdmoe_over_hf": cpu_medians["hf"] / cpu_medians["sdmoe"],
                "agreement": (
                    {"identical_generations": agreement}
                    if kind == "generate_until"
                    else {"max_abs_loglikelihood_difference": agreement}
                ),
            }
            print(
                f"{workload:>10} ({kind}): {len(requests[workload])} requests, {tokens} tokens; sdmoe "
                f"{results[workload]['tokens_per_second']['sdmoe']:.0f} tok/s, hf "
                f"{results[workload]['tokens_per_second']['hf']:.0f} tok/s, "
                f"speed-up {results[workload]['speedup_sdmoe_over_hf']:.2f}x (CPU time "
                f"{results[workload]['cpu_time_speedup_sdmoe_over_hf']:.2f}x); {results[workload]['agreement']}"
            )
    write_result(
        {
            "benchmark": "eval_throughput",
            "environment": environment(),
            "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
