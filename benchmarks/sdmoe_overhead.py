"""Training-step time and peak memory of SD-MoE (arXiv 2602.12556) vs the vanilla MoE, on CPU.

One step is what ``PretrainModule`` runs per optimizer step: forward, backward, the SD-MoE gradient split,
gradient clipping, AdamW, then the SD-MoE step end. Each variant lives in its own worker process, so the two
never share allocator state (on CPU, where a large buffer lands decides whether a step page-faults it in
again, which moved single phases by tens of ms when both models shared one process); the parent steps the
two workers alternately, one step each, so machine noise hits both alike, and reports medians of the times
the workers measure around their steps. The basis refresh that the step end runs every ``refresh_every``
steps is timed separately in the SD-MoE worker (``refresh_bases``, full and low-rank SVD) and amortised:
SD-MoE time = median step + refresh / refresh_every. Peak memory is each worker's growth of the peak
resident set (``VmHWM``, Linux) over its size after imports. Last, one expert bank of the headline config
is timed (fwd+bwd) as a plain bank, with SD-MoE proxies ``W_c + W_u``, and with the alternative that
applies W_c once to all routed rows (``x @ W_cᵀ``) next to a grouped GEMM on W_u.

    python benchmarks/sdmoe_overhead.py --out benchmarks/results/sdmoe_overhead.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from reporting import environment, write_result
from torch import Tensor

from sdmoe_train.lightning.optim import OptimConfig, build_optimizer
from sdmoe_train.models.config import AttentionConfig, MoEConfig, TransformerConfig
from sdmoe_train.models.presets import tiny_qwen_moe
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.experts import ExpertBank, grouped_linear
from sdmoe_train.moe.sdmoe import (
    DecoupledExpertBank,
    SDMoEConfig,
    apply_spectral_decoupling,
    decoupled_banks,
    finish_optimizer_step,
    project_gradients,
    refresh_bases,
    strict_update_reference,
)


def mid_size() -> TransformerConfig:
    """Hidden 512, 16 experts of width 512, top-2, one gated shared expert, 4 layers."""
    return TransformerConfig(
        vocab_size=4096,
        hidden_dim=512,
        n_layers=4,
        max_seq_len=256,
        attention=AttentionConfig(num_heads=8, num_kv_heads=4, qkv_bias=True),
        moe=MoEConfig(
            num_experts=16,
            top_k=2,
            expert_hidden_dim=512,
            num_shared_experts=1,
            shared_expert_gate=True,
            aux_loss_coef=0.01,
            z_loss_coef=0.001,
        ),
    )


CONFIGS: dict[str, tuple[Callable[[], TransformerConfig], int]] = {
    "tiny": (tiny_qwen_moe, 8),  # recipes/tiny_qwen_cpu.yaml: batch 8 x 256 tokens
    # 16 x 256 tokens route 512 rows to the average expert, as many as the expert is wide, so the expert
    # GEMMs are compute-bound as in real pretraining (rows per expert >> width there). The headline.
    "mid": (mid_size, 16),
    # 4 x 256 tokens: 128 rows per expert, a weight-bound corner where per-step costs that scale with the
    # parameters (AdamW, the SD-MoE split) weigh 4x more against the token work; reported next to it.
    "mid_small_batch": (mid_size, 4),
}
SEQ_LEN = 256


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--refresh-every", type=int, default=16)
    parser.add_argument(
        "--svd", choices=["full", "lowrank"], default="lowrank", help="refresh method of the headline ratio"
    )
    parser.add_argument("--strict", action="store_true")
    parser.add_argument(
        "--accumulate", type=int, default=1, help="micro-batches per optimizer step (the split runs once per step)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    return parser.parse_args()


class Trainee:
    """One model + optimizer + fixed batch, stepped like ``PretrainModule`` does."""

    def __init__(self, config: str, sdmoe: SDMoEConfig, accumulate: int = 1, seed: int = 0) -> None:
        build_arch, batch_size = CONFIGS[config]
        torch.manual_seed(seed)
        self.model = Transformer(build_arch())
        apply_spectral_decoupling(self.model, sdmoe)
        self.sdmoe = sdmoe
        self.accumulate = accumulate
        self.optimizer, _ = build_optimizer(
            self.model, OptimConfig(warmup_steps=0, schedule="constant"), {self.model.embed.weight}, 10**6
        )
        vocab = self.model.config.vocab_size
        self.batch = torch.randint(0, vocab, (batch_size, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))

    def step(self) -> None:
        """One optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.accumulate):
            out = self.model(self.batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), self.batch[:, 1:].flatten())
            ((loss + out.moe.loss) / self.accumulate).backward()
        apply_gradients(self.model, self.optimizer, self.sdmoe.enabled)


def apply_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sdmoe: bool) -> None:
    """What ``PretrainModule`` does with complete gradients: SD-MoE split, clipping at 1, AdamW, SD-MoE step end."""
    if sdmoe:
        project_gradients(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    reference = strict_update_reference(model) if sdmoe else None
    optimizer.step()
    if sdmoe:
        finish_optimizer_step(model, reference)


def sdmoe_config(args: argparse.Namespace, enabled: bool) -> SDMoEConfig:
    return SDMoEConfig(
        enabled=enabled, rank=args.rank, refresh_every=args.refresh_every, strict=args.strict, svd=args.svd
    )


def _median_seconds(function: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


VARIANTS = ("vanilla", "sdmoe")


def worker(config: str, variant: str, args: argparse.Namespace) -> None:
    """Serve one variant to the parent: a JSON line per command read from stdin (``step``, ``refresh SVD``,
    ``memory``), after a first line with the parameter count."""
    baseline = _peak_rss_bytes()
    # The timed SD-MoE model never reaches a refresh; the refresh (exactly what the step end calls every
    # refresh_every steps) is timed on its own on request and amortised by the parent.
    sdmoe = dataclasses.replace(sdmoe_config(args, variant == "sdmoe"), refresh_every=2**62)
    trainee = Trainee(config, sdmoe, args.accumulate)
    print(json.dumps({"parameters": sum(p.numel() for p in trainee.model.parameters())}), flush=True)
    for command in sys.stdin:
        name, *operands = command.split()
        if name == "step":
            start = time.perf_counter()
            trainee.step()
            reply: dict = {"seconds": time.perf_counter() - start}
        elif name == "refresh":
            for bank in decoupled_banks(trainee.model):
                bank.config = dataclasses.replace(bank.config, svd=operands[0])
            reply = {"seconds": _median_seconds(lambda: refresh_bases(trainee.model), repeats=5)}
        elif name == "memory":
            reply = {"baseline_bytes": baseline, "peak_growth_bytes": _peak_rss_bytes() - baseline}
        else:
            raise ValueError(f"unknown worker command {command!r}")
        print(json.dumps(reply), flush=True)


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, config: str, variant: str, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, "--worker", config, variant, "--rank", str(args.rank)]
        command += ["--refresh-every", str(args.refresh_every), "--svd", args.svd, "--accumulate", str(args.accumulate)]
        command += ["--strict"] * args.strict + (["--threads", str(args.threads)] if args.threads else [])
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.parameters = self._reply()["parameters"]

    def ask(self, command: str) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._reply()

    def _reply(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.process.args} exited with {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def measure(config: str, args: argparse.Namespace) -> dict:
    """Step times (round-robin over the two workers), amortised refresh and peak memory of one config."""
    workers = {variant: Worker(config, variant, args) for variant in VARIANTS}
    try:
        samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for repeat in range(args.warmup + args.steps):
            for variant, handle in workers.items():
                seconds = handle.ask("step")["seconds"]
                if repeat >= args.warmup:
                    samples[variant].append(seconds)
        refresh = {svd: workers["sdmoe"].ask(f"refresh {svd}")["seconds"] for svd in ("full", "lowrank")}
        memory = {variant: handle.ask("memory") for variant, handle in workers.items()}
        parameters = {variant: handle.parameters for variant, handle in workers.items()}
    finally:
        for handle in workers.values():
            handle.close()
    vanilla = statistics.median(samples["vanilla"])
    ordinary = statistics.median(samples["sdmoe"])
    amortised = {svd: ordinary + seconds / args.refresh_every for svd, seconds in refresh.items()}
    vanilla_growth, sdmoe_growth = (memory[variant]["peak_growth_bytes"] for variant in VARIANTS)
    return {
        "vanilla_ms": round(vanilla * 1e3, 2),
        "sdmoe_step_ms": round(ordinary * 1e3, 2),
        "refresh_ms": {svd: round(seconds * 1e3, 2) for svd, seconds in refresh.items()},
        "sdmoe_amortised_ms": {svd: round(seconds * 1e3, 2) for svd, seconds in amortised.items()},
        "overhead_ratio": amortised[args.svd] / vanilla,
        "overhead_ratio_by_svd": {svd: seconds / vanilla for svd, seconds in amortised.items()},
        "parameters": parameters,
        "tokens_per_step": CONFIGS[config][1] * SEQ_LEN * args.accumulate,
        "vanilla_peak_growth_mib": round(vanilla_growth / 2**20, 1),
        "sdmoe_peak_growth_mib": round(sdmoe_growth / 2**20, 1),
        "process_baseline_mib": round(memory["vanilla"]["baseline_bytes"] / 2**20, 1),
        "peak_memory_ratio": sdmoe_growth / vanilla_growth,
    }


def _shared_gemm_forward(
    bank: DecoupledExpertBank, x_ND: Tensor, tokens_per_expert_E: Tensor, weights_N: Tensor
) -> Tensor:
    """The rejected alternative to proxies: a grouped GEMM on W_u plus ``x @ W_cᵀ`` once over all routed rows."""

    def linear(matrix: str, rows_NI: Tensor) -> Tensor:
        common_MN, unique_EMN, _, _ = bank.parts(matrix)
        return grouped_linear(rows_NI, unique_EMN, tokens_per_expert_E) + rows_NI @ common_MN.T

    hidden_NF = F.silu(linear("gate", x_ND)) * linear("up", x_ND) * weights_N.unsqueeze(-1)
    return linear("down", hidden_NF)


def time_proxy_alternatives(config: str, args: argparse.Namespace) -> dict:
    """fwd+bwd of one expert bank: plain, SD-MoE proxies (``W_c + W_u``), SD-MoE with a shared W_c GEMM."""
    arch = CONFIGS[config][0]()
    batch_size = CONFIGS[config][1]
    torch.manual_seed(0)
    plain = ExpertBank(arch.moe.num_experts, arch.hidden_dim, arch.moe.expert_hidden_dim)
    for bank_EMN in plain.parameters():
        torch.nn.init.normal_(bank_EMN, std=arch.init_std)
    stds = {"gate": arch.init_std, "up": arch.init_std, "down": arch.init_std}
    decoupled = DecoupledExpertBank(plain, sdmoe_config(args, True), stds, layer_index=0)
    rows = batch_size * SEQ_LEN * arch.moe.top_k
    x_ND = torch.randn(rows, arch.hidden_dim, requires_grad=True)
    tokens_per_expert_E = torch.full((arch.moe.num_experts,), rows // arch.moe.num_experts)
    weights_N, grad_ND = torch.rand(rows), torch.randn(rows, arch.hidden_dim)
    variants = {
        "plain": lambda: plain(x_ND, tokens_per_expert_E, weights_N),
        "proxy": lambda: decoupled(x_ND, tokens_per_expert_E, weights_N),
        "shared_gemm": lambda: _shared_gemm_forward(decoupled, x_ND, tokens_per_expert_E, weights_N),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.steps + args.warmup):
        for name, forward in variants.items():
            start = time.perf_counter()
            forward().backward(grad_ND)
            if repeat >= args.warmup:
                samples[name].append(time.perf_counter() - start)
    return {f"{name}_ms": round(statistics.median(values) * 1e3, 2) for name, values in samples.items()}


def _peak_rss_bytes() -> int:
    # VmHWM belongs to the address space, which exec replaces; ru_maxrss would instead carry the parent's
    # peak into a child that was forked from a large process. Linux only.
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kib * 1024


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(*args.worker, args)
        return
    per_config = {}
    for config in args.configs:
        per_config[config] = measure(config, args)
        row = per_config[config]
        amortised, ratios = row["sdmoe_amortised_ms"], row["overhead_ratio_by_svd"]
        print(
            f"{config:>5}: vanilla {row['vanilla_ms']:7.1f} ms | SD-MoE step {row['sdmoe_step_ms']:7.1f} ms, "
            f"with refresh amortised {amortised['lowrank']:7.1f} ms (lowrank SVD, x{ratios['lowrank']:.3f}) / "
            f"{amortised['full']:7.1f} ms (full SVD, x{ratios['full']:.3f}) "
            f"| peak memory x{row['peak_memory_ratio']:.3f}"
        )
    headline_config = "mid" if "mid" in per_config else args.configs[0]
    headline = per_config[headline_config]
    proxy = time_proxy_alternatives(headline_config, args)
    print(
        f"one expert bank fwd+bwd ({headline_config}): plain {proxy['plain_ms']:.1f} ms, W_c + W_u proxies "
        f"{proxy['proxy_ms']:.1f} ms, shared x·W_cᵀ GEMM {proxy['shared_gemm_ms']:.1f} ms"
    )
    result = {
        "benchmark": "sdmoe_training_step_overhead",
        "overhead_ratio": headline["overhead_ratio"],
        "peak_memory_ratio": headline["peak_memory_ratio"],
        "configs": per_config,
        "proxy_construction": {"config": headline_config, **proxy},
        "settings": {
            "rank": args.rank,
            "refresh_every": args.refresh_every,
            "svd": args.svd,
            "strict": args.strict,
            "accumulate": args.accumulate,
            "steps": args.steps,
            "seq_len": SEQ_LEN,
            "batch_size": {name: CONFIGS[name][1] for name in args.configs},
            "dtype": "float32",
            "threads": torch.get_num_threads(),
        },
        **environment(),
    }
    print(f"overhead_ratio = {result['overhead_ratio']:.3f} ({args.svd} SVD; target <= 1.03)")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
