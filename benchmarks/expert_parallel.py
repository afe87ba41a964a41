"""Step time, all-to-all share and peak memory per rank of expert parallelism (ep_size 2 vs 1), 2 CPU processes.

Two gloo processes train the same MoE on their own rows of each global batch, once as plain data
parallelism (``ep_size=1``: every rank holds all experts) and once expert-parallel (``ep_size=2``: each rank
holds half of them and exchanges tokens by all-to-all). One step is forward, backward, gradient averaging
(:func:`sdmoe_train.parallel.expert_parallel.average_gradients`) and AdamW. Both layouts live in the same
two processes and are timed alternately, one step each, so machine noise hits both alike; a rank's step
time is the slower rank's (the barrier after each step makes them equal). The all-to-all share is the time
spent inside ``all_to_all_single`` (forward and backward exchanges and the count exchange) over the
ep_size=2 step time. Peak memory is the growth of each rank's peak resident set (``VmHWM``, Linux) while
building and training one layout, in a fresh pair of processes per layout.

    python benchmarks/expert_parallel.py --out benchmarks/results/expert_parallel.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from reporting import environment, write_result

from sdmoe_train.models.config import AttentionConfig, MoEConfig, TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.parallel import all_to_all as all_to_all_module
from sdmoe_train.parallel.expert_parallel import apply_expert_parallel, average_gradients
from sdmoe_train.parallel.groups import build_expert_parallel_groups

WORLD_SIZE = 2


def bench_config() -> TransformerConfig:
    """Hidden 256, 16 experts of width 512 (top-2), 2 layers: experts hold most of the parameters."""
    return TransformerConfig(
        vocab_size=4096,
        hidden_dim=256,
        n_layers=2,
        max_seq_len=256,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        moe=MoEConfig(num_experts=16, top_k=2, expert_hidden_dim=512, num_shared_experts=0, aux_loss_coef=0.01),
    )


class _TimedCollectives:
    """Stands in for ``torch.distributed`` inside the all-to-all module and clocks ``all_to_all_single``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def all_to_all_single(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = dist.all_to_all_single(*args, **kwargs)
        self.seconds += time.perf_counter() - started
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)


class _Trainee:
    def __init__(self, ep_size: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = Transformer(bench_config())
        self.groups = build_expert_parallel_groups(ep_size)
        apply_expert_parallel(self.model, self.groups)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def step(self, tokens: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        out = self.model(tokens[:, :-1])
        (F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()) + out.moe.loss).backward()
        average_gradients(self.model, self.groups)
        self.optimizer.step()


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024


def _batches(args: argparse.Namespace, rank: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, 4096, (count, args.batch_size, args.seq_len + 1), generator=generator)


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)


def _timing_worker(rank: int, args: argparse.Namespace, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    clock = _TimedCollectives()
    all_to_all_module.dist = clock
    trainees = {1: _Trainee(1, seed=0), 2: _Trainee(2, seed=0)}
    times: dict[int, list[float]] = {1: [], 2: []}
    all_to_all_seconds: list[float] = []
    for index, tokens in enumerate(_batches(args, rank, args.warmup + args.steps)):
        for ep_size, trainee in trainees.items():
            dist.barrier()
            clock.seconds = 0.0
            started = time.perf_counter()
            trainee.step(tokens)
            dist.barrier()
            if index >= args.warmup:
                times[ep_size].append(time.perf_counter() - started)
                if ep_size == 2:
                    all_to_all_seconds.append(clock.seconds)
    torch.save({"times": times, "all_to_all": all_to_all_seconds}, Path(out_dir) / f"timing{rank}.pt")
    dist.destroy_process_group()


def _memory_worker(rank: int, args: argparse.Namespace, ep_size: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    baseline = _peak_rss_bytes()
    trainee = _Trainee(ep_size, seed=0)
    for tokens in _batches(args, rank, args.memory_steps):
        trainee.step(tokens)
    parameter_bytes = sum(p.numel() * p.element_size() for p in trainee.model.parameters())
    growth = _peak_rss_bytes() - baseline
    torch.save({"peak_growth_bytes": growth, "parameter_bytes": parameter_bytes}, Path(out_dir) / f"memory{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory_steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(_timing_worker, args=(args, f"{scratch}/init_timing", scratch), nprocs=WORLD_SIZE)
        timing = [torch.load(Path(scratch) / f"timing{rank}.pt") for rank in range(WORLD_SIZE)]
        memory = {}
        for ep_size in (1, 2):
            mp.spawn(
                _memory_worker, args=(args, ep_size, f"{scratch}/init_memory{ep_size}", scratch), nprocs=WORLD_SIZE
            )
            memory[ep_size] = [torch.load(Path(scratch) / f"memory{rank}.pt") for rank in range(WORLD_SIZE)]

    step_ms = {ep: statistics.median(timing[0]["times"][ep]) * 1e3 for ep in (1, 2)}
    # Medians of per-step sums over ranks' own a2a time, then the busier rank.
    a2a_ms = max(statistics.median(rank_timing["all_to_all"]) * 1e3 for rank_timing in timing)
    peak_mib = {ep: [rank["peak_growth_bytes"] / 2**20 for rank in memory[ep]] for ep in (1, 2)}
    param_mib = {ep: [rank["parameter_bytes"] / 2**20 for rank in memory[ep]] for ep in (1, 2)}
    result = {
        "environment": environment(),
        "config": {**vars(args), "out": None, "world_size": WORLD_SIZE, "model": "bench_config()"},
        "step_ms_median": {f"ep_size_{ep}": step_ms[ep] for ep in (1, 2)},
        "step_time_ratio_ep2_over_ep1": step_ms[2] / step_ms[1],
        "all_to_all_ms_median": a2a_ms,
        "all_to_all_share_of_ep2_step": a2a_ms / step_ms[2],
        "peak_rss_growth_mib_per_rank": {f"ep_size_{ep}": peak_mib[ep] for ep in (1, 2)},
        "peak_memory_ratio_ep2_over_ep1": max(peak_mib[2]) / max(peak_mib[1]),
        "parameter_mib_per_rank": {f"ep_size_{ep}": param_mib[ep] for ep in (1, 2)},
    }
    print(
        f"step time (median of {args.steps}, slower rank): ep_size=1 {step_ms[1]:.1f} ms, ep_size=2 {step_ms[2]:.1f} ms"
    )
    print(f"  ratio ep2/ep1 {result['step_time_ratio_ep2_over_ep1']:.2f}")
    print(
        f"all-to-all inside the ep_size=2 step: {a2a_ms:.1f} ms ({100 * result['all_to_all_share_of_ep2_step']:.1f} %)"
    )
    for ep in (1, 2):
        print(
            f"ep_size={ep}: peak RSS growth per rank {', '.join(f'{m:.0f}' for m in peak_mib[ep])} MiB; "
            f"parameters per rank {param_mib[ep][0]:.1f} MiB"
        )
    print(f"  peak memory ratio ep2/ep1 {result['peak_memory_ratio_ep2_over_ep1']:.2f}")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
