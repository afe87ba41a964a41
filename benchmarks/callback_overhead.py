"""Training-step time with every monitoring callback at its default interval, against no callbacks, on CPU.

Two identical models (same init, same fixed batch) are stepped alternately, one optimizer step each, in one
process, the first of each pair swapping every step, so machine noise hits both alike: one bare, one with
:class:`RoutingHealthMonitor`, :class:`SpectralOverlapMonitor`, :class:`GradientAlignmentMonitor` and
:class:`GateAlignmentMonitor` at their default settings, driven through the same hooks, in the same order,
as Lightning's fit loop calls them (``on_train_batch_start``, ``on_before_optimizer_step`` before the
gradient split and clipping, ``on_train_batch_end`` after the step), with a ``CSVLogger`` receiving the
scalars. The monitors' cost sits in the few steps that end an interval, so the ratio is of *total* (mean)
step times over ``--steps``, a whole number of the longest interval; medians of the per-step times are
reported too, as the hot-path cost.

    python benchmarks/callback_overhead.py --out benchmarks/results/callback_overhead.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from reporting import environment, write_result
from sdmoe_overhead import CONFIGS as SDMOE_CONFIGS
from sdmoe_overhead import SEQ_LEN, apply_gradients

from sdmoe_train.lightning.callbacks import (
    GateAlignmentMonitor,
    GradientAlignmentMonitor,
    RoutingHealthMonitor,
    SpectralOverlapMonitor,
)
from sdmoe_train.lightning.optim import OptimConfig, build_optimizer
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import SDMoEConfig, apply_spectral_decoupling

CONFIGS = {"tiny": SDMOE_CONFIGS["tiny"], "mid": SDMOE_CONFIGS["mid_small_batch"]}
"""The mid-size model at 4 x 256 tokens per step, the batch docs/monitoring.md quotes."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["mid", "tiny"], choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant (default: one interval)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--sdmoe", action="store_true", help="measure SD-MoE models (unique parts monitored too)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


class _Strategy:
    """A single process's answers to the collectives the monitors issue."""

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


class MonitoredTrainee:
    """One model + optimizer + fixed batch, stepped like ``PretrainModule`` under a Trainer, with callbacks."""

    def __init__(self, config: str, sdmoe: SDMoEConfig, callbacks: list[L.Callback], log_dir: Path) -> None:
        build_arch, batch_size = CONFIGS[config]
        torch.manual_seed(0)
        self.model = Transformer(build_arch())
        apply_spectral_decoupling(self.model, sdmoe)
        self.sdmoe = sdmoe
        self.optimizer, _ = build_optimizer(
            self.model, OptimConfig(warmup_steps=0, schedule="constant"), {self.model.embed.weight}, 10**6
        )
        vocab = self.model.config.vocab_size
        self.batch = torch.randint(0, vocab, (batch_size, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
        self.callbacks = callbacks
        # What the callbacks read from the Trainer and the LightningModule.
        self.trainer = SimpleNamespace(
            global_step=0,
            is_global_zero=True,
            strategy=_Strategy(),
            loggers=[CSVLogger(log_dir, name="", version="")],
            log_dir=str(log_dir),
            default_root_dir=str(log_dir),
        )
        self.module = SimpleNamespace(model=self.model, last_routing=None)
        for callback in callbacks:
            callback.setup(self.trainer, self.module, "fit")

    def step(self) -> None:
        """One optimizer step with the callback hooks where Lightning calls them."""
        trainer, module = self.trainer, self.module
        for callback in self.callbacks:
            callback.on_train_batch_start(trainer, module, self.batch, 0)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), self.batch[:, 1:].flatten())
        module.last_routing = out.moe
        (loss + out.moe.loss).backward()
        for callback in self.callbacks:
            callback.on_before_optimizer_step(trainer, module, self.optimizer)
        apply_gradients(self.model, self.optimizer, self.sdmoe.enabled)
        trainer.global_step += 1
        for callback in self.callbacks:
            callback.on_train_batch_end(trainer, module, None, self.batch, 0)


def default_monitors() -> list[L.Callback]:
    """Every monitor with its constructor defaults."""
    return [RoutingHealthMonitor(), SpectralOverlapMonitor(), GradientAlignmentMonitor(), GateAlignmentMonitor()]


def time_round_robin(config: str, args: argparse.Namespace, log_dir: Path) -> dict:
    sdmoe = SDMoEConfig(enabled=args.sdmoe)
    trainees = {
        "bare": MonitoredTrainee(config, sdmoe, [], log_dir / config / "bare"),
        "monitored": MonitoredTrainee(config, sdmoe, default_monitors(), log_dir / config / "monitored"),
    }
    for _ in range(args.warmup):
        for trainee in trainees.values():
            trainee.step()
    # Restart the step count so that the timed steps cover whole intervals, as in a run from step 0.
    for trainee in trainees.values():
        trainee.trainer.global_step = 0
    samples: dict[str, list[float]] = {name: [] for name in trainees}
    order = list(trainees)
    for _ in range(args.steps):
        # Swap which variant goes first every step: the second of a pair measurably runs faster on CPU
        # (warm caches), which would otherwise favour one side.
        order.reverse()
        for name in order:
            start = time.perf_counter()
            trainees[name].step()
            samples[name].append(time.perf_counter() - start)
    bare, monitored = samples["bare"], samples["monitored"]
    return {
        "bare_mean_ms": round(statistics.fmean(bare) * 1e3, 2),
        "monitored_mean_ms": round(statistics.fmean(monitored) * 1e3, 2),
        "bare_median_ms": round(statistics.median(bare) * 1e3, 2),
        "monitored_median_ms": round(statistics.median(monitored) * 1e3, 2),
        "monitored_slowest_ms": round(max(monitored) * 1e3, 2),
        "overhead_ratio": sum(monitored) / sum(bare),
        "median_ratio": statistics.median(monitored) / statistics.median(bare),
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    per_config = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for config in args.configs:
            row = per_config[config] = time_round_robin(config, args, Path(log_dir))
            print(
                f"{config:>5}: bare {row['bare_mean_ms']:7.1f} ms/step | with monitors {row['monitored_mean_ms']:7.1f} "
                f"ms/step (x{row['overhead_ratio']:.3f}; medians x{row['median_ratio']:.3f}; slowest monitored step "
                f"{row['monitored_slowest_ms']:.0f} ms)"
            )
    headline_config = "mid" if "mid" in per_config else args.configs[0]
    result = {
        "benchmark": "monitoring_callback_overhead",
        "overhead_ratio": per_config[headline_config]["overhead_ratio"],
        "headline_config": headline_config,
        "configs": per_config,
        "settings": {
            "steps": args.steps,
            "sdmoe": args.sdmoe,
            "monitors": {type(m).__name__: m.every_n_steps for m in default_monitors()},
            "seq_len": SEQ_LEN,
            "batch_size": {name: CONFIGS[name][1] for name in args.configs},
            "dtype": "float32",
            "threads": torch.get_num_threads(),
        },
        **environment(),
    }
    print(f"overhead_ratio = {result['overhead_ratio']:.3f} ({headline_config}; target < 1.02)")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
