"""Forward+backward time of one MoE layer: sort-based dispatch vs a naive per-expert loop vs a dense FFN.

The dense baseline is a SwiGLU with the same *active* parameters (intermediate = top_k x expert width),
i.e. the FLOP floor an MoE layer could reach. Variants are timed round-robin in one process so that
machine noise hits all of them alike; medians are reported.

    python benchmarks/moe_layer.py --out benchmarks/results/moe_layer.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from reporting import environment, write_result
from torch import Tensor

from sdmoe_train.moe.config import MoEConfig
from sdmoe_train.moe.experts import reference_moe_forward
from sdmoe_train.moe.layer import MoELayer
from sdmoe_train.moe.mlp import SwiGLU


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--expert-hidden", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def make_step(forward: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        forward(x).backward(grad)

    return step


def time_round_robin(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_hidden_dim=args.expert_hidden)
    layer = MoELayer(args.hidden, config).to(args.device)
    dense = SwiGLU(args.hidden, args.top_k * args.expert_hidden).to(args.device)
    for param in [*layer.parameters(), *dense.parameters()]:
        torch.nn.init.normal_(param, std=0.02)

    x_BSD = torch.randn(1, args.tokens, args.hidden, device=args.device, requires_grad=True)
    grad_BSD = torch.randn_like(x_BSD)

    def ours(x: Tensor) -> Tensor:
        return layer(x)[0]

    def naive(x: Tensor) -> Tensor:
        x_TD = x.view(-1, args.hidden)
        routing = layer.router(x_TD)
        return reference_moe_forward(x_TD, routing.expert_ids_TK, routing.weights_TK, layer.experts).view_as(x)

    with torch.no_grad():
        torch.testing.assert_close(ours(x_BSD), naive(x_BSD), rtol=1e-4, atol=1e-5)

    steps = {name: make_step(fn, x_BSD, grad_BSD) for name, fn in [("ours", ours), ("naive", naive), ("dense", dense)]}
    seconds = time_round_robin(steps, args.repeats, args.warmup, args.device)
    result = {
        "benchmark": "moe_layer_forward_backward",
        "config": {
            "tokens": args.tokens,
            "hidden": args.hidden,
            "experts": args.experts,
            "expert_hidden": args.expert_hidden,
            "top_k": args.top_k,
            "dtype": "float32",
            "device": args.device,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
        },
        "median_ms": {name: round(value * 1e3, 3) for name, value in seconds.items()},
        "ratio_vs_dense": seconds["ours"] / seconds["dense"],
        "speedup_vs_naive": seconds["naive"] / seconds["ours"],
        **environment(),
    }
    for name, value in result["median_ms"].items():
        print(f"{name:>6}: {value:9.2f} ms")
    print(f"ours / dense-active FFN = {result['ratio_vs_dense']:.2f}x   (target <= 1.5)")
    print(f"naive / ours            = {result['speedup_vs_naive']:.2f}x   (target >= 2)")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
