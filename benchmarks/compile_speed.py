"""Training-step time with every decoder block compiled (``model.parallel.compile: true``) vs eager.

Two copies of the same model (same initial weights, same fixed batch) are stepped alternately in one process,
one step each, so machine noise hits both alike; one step is what ``PretrainModule`` runs per optimizer step
(forward, backward, clipping, AdamW; ``benchmarks/sdmoe_overhead.py``'s ``Trainee``). The compiled copy's
first steps include compilation: ``warmup_s`` is the time of the warm-up steps beyond as many eager steps;
medians of the steps after them give the ratio. At the end both copies' logits on the batch are compared
(after the same steps they should differ by rounding only).

    python benchmarks/compile_speed.py --out benchmarks/results/compile_speed.json

Configs: ``demo`` is the ``make demo`` model (tiny Qwen-style, 8 × 256 tokens per step), ``mid`` the mid-size
model of ``sdmoe_overhead.py`` (hidden 512, 16 experts of width 512, top-2, 4 layers, 16 × 256 tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo
from reporting import environment, write_result
from sdmoe_overhead import Trainee

from sdmoe_train.models.compilation import compile_blocks
from sdmoe_train.moe.sdmoe import SDMoEConfig

CONFIGS = {"demo": "tiny", "mid": "mid"}
"""Benchmark config name -> ``sdmoe_overhead`` config (architecture and batch)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compilation)")
    parser.add_argument("--sdmoe", action="store_true", help="train the SD-MoE variant of each model")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def _logits(trainee: Trainee) -> torch.Tensor:
    with torch.no_grad():
        return trainee.model(trainee.batch[:, :-1]).logits


def measure(config: str, args: argparse.Namespace) -> dict:
    sdmoe = SDMoEConfig(enabled=args.sdmoe, rank=8, svd="lowrank")
    eager, compiled = Trainee(CONFIGS[config], sdmoe), Trainee(CONFIGS[config], sdmoe)
    compile_blocks(compiled.model)
    torch._dynamo.utils.counters.clear()
    warmup = {"eager": [], "compiled": []}
    samples = {"eager": [], "compiled": []}
    for repeat in range(args.warmup + args.steps):
        for name, trainee in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            trainee.step()
            (warmup if repeat < args.warmup else samples)[name].append(time.perf_counter() - start)
    eager_ms, compiled_ms = (statistics.median(samples[name]) * 1e3 for name in ("eager", "compiled"))
    counters = torch._dynamo.utils.counters
    return {
        "eager_ms": round(eager_ms, 1),
        "compiled_ms": round(compiled_ms, 1),
        "compiled_over_eager": compiled_ms / eager_ms,
        "warmup_s": round(sum(warmup["compiled"]) - sum(warmup["eager"]), 1),
        "first_compiled_step_s": round(warmup["compiled"][0], 1),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "max_logit_difference_at_end": float((_logits(eager) - _logits(compiled)).abs().max()),
        "tokens_per_step": int(eager.batch[:, :-1].numel()),
        "samples_ms": {name: [round(s * 1e3, 1) for s in values] for name, values in samples.items()},
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    per_config = {}
    for config in args.configs:
        row = per_config[config] = measure(config, args)
        print(
            f"{config:>4}: eager {row['eager_ms']:8.1f} ms | compiled {row['compiled_ms']:8.1f} ms "
            f"(x{row['compiled_over_eager']:.3f}) | compile warm-up {row['warmup_s']:.0f} s, "
            f"{row['graphs']} graphs, {row['graph_breaks']} graph breaks"
        )
    result = {
        "benchmark": "compile_speed",
        "configs": per_config,
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "sdmoe": args.sdmoe,
            "threads": torch.get_num_threads(),
        },
        "environment": environment(),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
