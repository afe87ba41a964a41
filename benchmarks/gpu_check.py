"""One-shot check of a fresh GPU node: does the install work, and how fast does it train? (meant for < 10 min)

    make gpu-check                                   # writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --out result.json [--layers 4 --batch 4 --seq 2048 --no-compile]

On CUDA (or ROCm) it reports, as JSON and as a short table:

1. the environment: torch, CUDA/HIP, cuDNN, NCCL and driver versions, every visible device;
2. bf16 training steps (autocast, fp32 master weights and AdamW, as ``bf16-mixed``) of a ``--layers``-layer slice
   of the SD-MoE paper's 2B-A0.8B presets, Qwen-style (GQA) and DeepSeek-style (MLA): step time, tokens/s,
   model TFLOPS (:mod:`sdmoe_train.models.flops`), MFU against the device's dense bf16 peak, peak memory.
   The models are built on the meta device and materialised on the GPU, as ``PretrainModule`` does;
3. one MoE layer of that preset, forward + backward: grouped GEMM vs the per-expert loop;
4. the SD-MoE step-time overhead on the Qwen slice (gradient split and the refresh amortised included);
5. compiled decoder blocks (``model.parallel.compile``) vs eager on the Qwen slice, with the compile time;
6. a 3-step Lightning ``fit`` of the Qwen slice with :class:`PerformanceMonitor`, the logged ``perf/*`` values.

Without a GPU it runs the same code on the tiny presets in fp32 (the test suite does this), skipping compile
unless ``--compile`` is given. Nothing is downloaded; the tokens are random. A part that fails (say, compile
on an untested driver) is reported with its error in the JSON and the table, the other parts still run, and
the script exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from moe_layer import make_step, time_round_robin
from reporting import environment, write_result
from sdmoe_overhead import apply_gradients
from torch.utils.data import DataLoader

from sdmoe_train.lightning.callbacks import PerformanceMonitor
from sdmoe_train.lightning.callbacks.throughput import peak_bf16_tflops
from sdmoe_train.lightning.module import PretrainModule, language_model_loss
from sdmoe_train.lightning.optim import OptimConfig, build_optimizer
from sdmoe_train.models import presets
from sdmoe_train.models.compilation import compile_blocks
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.flops import training_flops_per_token
from sdmoe_train.moe.experts import reference_moe_forward
from sdmoe_train.moe.layer import MoELayer
from sdmoe_train.moe.sdmoe import SDMoEConfig, refresh_bases

GIB = 2**30
FAMILIES = {"qwen": "qwen_moe_2b_a0_8b", "deepseek": "deepseek_moe_2b_a0_8b"}
TINY_FAMILIES = {"qwen": "tiny_qwen_moe", "deepseek": "tiny_deepseek_moe"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the slice (GPU 4, CPU 2)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (GPU 4, CPU 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (GPU 2048, CPU 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (GPU 10, CPU 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 3, CPU 1)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on GPUs")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: look up)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    defaults = {"layers": (4, 2), "batch": (4, 2), "seq": (2048, 64), "steps": (10, 2), "warmup": (3, 1)}
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_gpu else cpu)
    if args.compile is None:
        args.compile = on_gpu
    return args


def environment_report() -> dict[str, Any]:
    """Versions and devices: what a bug report about this node needs."""
    report: dict[str, Any] = {
        **environment(),
        "python": platform.python_version(),
        "lightning": L.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None,
        "driver": None,
        "devices": [],
    }
    if not torch.cuda.is_available():
        return report
    if hasattr(torch.cuda, "nccl"):
        try:
            report["nccl"] = ".".join(str(part) for part in torch.cuda.nccl.version())
        except (RuntimeError, AttributeError, TypeError):  # ROCm builds report RCCL differently
            report["nccl"] = None
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        report["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.TimeoutExpired):
        report["driver"] = None
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        report["devices"].append(
            {
                "name": properties.name,
                "capability": f"{properties.major}.{properties.minor}",
                "memory_gib": round(properties.total_memory / GIB, 1),
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "peak_bf16_tflops": peak_bf16_tflops(properties.name),
            }
        )
    return report


def slice_config(family: str, args: argparse.Namespace) -> TransformerConfig:
    """The first ``args.layers`` layers of the family's 2B preset on GPUs, its tiny preset on CPU."""
    names = FAMILIES if torch.cuda.is_available() else TINY_FAMILIES
    config = presets.PRESETS[names[family]]()
    config.n_layers = args.layers
    config.max_seq_len = max(config.max_seq_len, args.seq)
    if not torch.cuda.is_available():
        config.vocab_size = 512
    return config


class Trainee:
    """A model built like ``PretrainModule`` builds it, stepped like ``PretrainModule`` steps it."""

    def __init__(self, config: TransformerConfig, args: argparse.Namespace, sdmoe: bool = False) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = self.device.type == "cuda"  # CPUs lack bf16 instructions: fp32 there (README)
        torch.manual_seed(0)
        # No basis refresh inside the timed steps: measure_sdmoe times it on its own and amortises it.
        module = PretrainModule(config, sdmoe=SDMoEConfig(enabled=sdmoe, rank=8, svd="lowrank", refresh_every=2**62))
        with torch.device(self.device):
            module.configure_model()  # meta -> materialised straight on the device
        self.model = module.model
        self.sdmoe = module.sdmoe
        self.optimizer, _ = build_optimizer(
            self.model, OptimConfig(warmup_steps=0, schedule="constant"), {self.model.embed.weight}, 10**6
        )
        generator = torch.Generator().manual_seed(0)
        self.batch = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=generator).to(
            self.device
        )

    def step(self) -> float:
        """One optimizer step; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(self.batch[:, :-1])
            loss = language_model_loss(out.logits, self.batch[:, 1:]) + out.moe.loss
        loss.backward()
        apply_gradients(self.model, self.optimizer, self.sdmoe.enabled)
        return float(loss.detach())


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(step: Callable[[], object]) -> float:
    _synchronize()
    start = time.perf_counter()
    step()
    _synchronize()
    return time.perf_counter() - start


def measure_training(family: str, args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    config = slice_config(family, args)
    built = time.perf_counter()
    trainee = Trainee(config, args)
    build_s = time.perf_counter() - built
    losses = [trainee.step() for _ in range(args.warmup)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.steps):
        seconds.append(_timed(lambda: losses.append(trainee.step())))
    step_s = statistics.median(seconds)
    tokens = args.batch * args.seq
    flops = training_flops_per_token(config, args.seq)
    tflops = tokens / step_s * flops.total / 1e12
    return {
        "preset": config_name(family),
        "layers": config.n_layers,
        "parameters": sum(p.numel() for p in trainee.model.parameters()),
        "tokens_per_step": tokens,
        "build_s": round(build_s, 2),
        "step_ms": round(step_s * 1e3, 2),
        "tokens_per_sec": round(tokens / step_s, 1),
        "tflops": round(tflops, 3),
        "mfu": None if peak is None else tflops / peak,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if torch.cuda.is_available() else None,
        "training_flops_per_token": flops.as_dict(),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def config_name(family: str) -> str:
    return (FAMILIES if torch.cuda.is_available() else TINY_FAMILIES)[family]


def measure_moe_layer(args: argparse.Namespace) -> dict[str, Any]:
    """One MoE layer of the Qwen slice, forward + backward: grouped GEMM vs the per-expert loop."""
    config = slice_config("qwen", args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = MoELayer(config.hidden_dim, config.moe).to(device=device, dtype=dtype)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=config.init_std)
    x_BSD = torch.randn(args.batch, args.seq, config.hidden_dim, device=device, dtype=dtype, requires_grad=True)

    def loop(x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, config.hidden_dim)
        routing = layer.router(x_TD)
        return reference_moe_forward(x_TD, routing.expert_ids_TK, routing.weights_TK, layer.experts).view_as(x)

    steps = {
        "grouped_gemm": make_step(lambda x: layer(x)[0], x_BSD, torch.randn_like(x_BSD)),
        "per_expert_loop": make_step(loop, x_BSD, torch.randn_like(x_BSD)),
    }
    seconds = time_round_robin(steps, args.steps, args.warmup, device)
    return {
        "tokens": args.batch * args.seq,
        "dtype": str(dtype).removeprefix("torch."),
        "grouped_gemm_ms": round(seconds["grouped_gemm"] * 1e3, 3),
        "per_expert_loop_ms": round(seconds["per_expert_loop"] * 1e3, 3),
        "loop_over_grouped": seconds["per_expert_loop"] / seconds["grouped_gemm"],
    }


def measure_sdmoe(args: argparse.Namespace) -> dict[str, Any]:
    """SD-MoE vs vanilla training steps on the Qwen slice, alternating; the basis refresh amortised over 16."""
    config = slice_config("qwen", args)
    trainees = {"vanilla": Trainee(config, args), "sdmoe": Trainee(config, args, sdmoe=True)}
    for _ in range(args.warmup):
        for trainee in trainees.values():
            trainee.step()
    samples: dict[str, list[float]] = {name: [] for name in trainees}
    for _ in range(args.steps):
        for name, trainee in trainees.items():
            samples[name].append(_timed(trainee.step))
    refresh_s = _timed(lambda: refresh_bases(trainees["sdmoe"].model))
    refresh_every = SDMoEConfig().refresh_every
    vanilla, sdmoe = (statistics.median(samples[name]) for name in ("vanilla", "sdmoe"))
    return {
        "vanilla_step_ms": round(vanilla * 1e3, 2),
        "sdmoe_step_ms": round(sdmoe * 1e3, 2),
        "refresh_ms": round(refresh_s * 1e3, 2),
        "refresh_every": refresh_every,
        "overhead_ratio": (sdmoe + refresh_s / refresh_every) / vanilla,
    }


def measure_compile(args: argparse.Namespace) -> dict[str, Any]:
    """Compiled decoder blocks vs eager on the Qwen slice; warm-up = compile time beyond eager steps."""
    config = slice_config("qwen", args)
    trainees = {"eager": Trainee(config, args), "compiled": Trainee(config, args)}
    compile_blocks(trainees["compiled"].model)
    warmup = {name: sum(_timed(trainee.step) for _ in range(args.warmup)) for name, trainee in trainees.items()}
    samples: dict[str, list[float]] = {name: [] for name in trainees}
    for _ in range(args.steps):
        for name, trainee in trainees.items():
            samples[name].append(_timed(trainee.step))
    eager, compiled = (statistics.median(samples[name]) for name in ("eager", "compiled"))
    return {
        "eager_step_ms": round(eager * 1e3, 2),
        "compiled_step_ms": round(compiled * 1e3, 2),
        "compiled_over_eager": compiled / eager,
        "warmup_s": round(warmup["compiled"] - warmup["eager"], 1),
    }


def lightning_fit(args: argparse.Namespace, peak: float | None, log_dir: Path) -> dict[str, Any]:
    """3 optimizer steps of ``Trainer.fit`` (bf16-mixed on GPUs) with PerformanceMonitor logging every step."""
    config = slice_config("qwen", args)
    blocks = torch.randint(0, config.vocab_size, (3 * args.batch, args.seq + 1), generator=torch.Generator())
    on_gpu = torch.cuda.is_available()
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if on_gpu else "32-true",
        max_steps=3,
        logger=L.pytorch.loggers.CSVLogger(log_dir, name="", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PerformanceMonitor(every_n_steps=1, peak_tflops=peak)],
    )
    module = PretrainModule(config, OptimConfig(warmup_steps=1, schedule="constant"))
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(list(blocks), batch_size=args.batch))
    logged = {key: float(value) for key, value in trainer.logged_metrics.items()}
    perf = _last_logged_perf(log_dir / "metrics.csv")
    return {"fit_s": round(time.perf_counter() - started, 1), "train_loss": logged.get("train/loss"), "perf": perf}


def _last_logged_perf(metrics_csv: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    with open(metrics_csv) as handle:
        for row in csv.DictReader(handle):
            last.update({key: float(value) for key, value in row.items() if key.startswith("perf/") and value})
    return last


def print_table(result: dict[str, Any]) -> None:
    print(f"{'model':<28} {'step ms':>9} {'tokens/s':>10} {'TFLOPS':>8} {'MFU':>6} {'peak GiB':>9}")
    for family, row in result["training"].items():
        if "error" in row:
            print(f"{config_name(family):<28} failed: {row['error']}")
            continue
        mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
        memory = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
        name = f"{row['preset']} ({row['layers']} layers)"
        print(
            f"{name:<28} {row['step_ms']:>9.1f} {row['tokens_per_sec']:>10.0f} {row['tflops']:>8.2f} "
            f"{mfu:>6} {memory:>9}"
        )
    lines = {
        "moe_layer": lambda moe: (
            f"MoE layer fwd+bwd: grouped GEMM {moe['grouped_gemm_ms']:.2f} ms, per-expert loop "
            f"{moe['per_expert_loop_ms']:.2f} ms ({moe['loop_over_grouped']:.2f}x)"
        ),
        "sdmoe": lambda sdmoe: f"SD-MoE training step: x{sdmoe['overhead_ratio']:.3f} of the vanilla step",
        "compile": lambda compiled: (
            f"compile: skipped ({compiled['skipped']})"
            if "skipped" in compiled
            else f"compiled blocks: x{compiled['compiled_over_eager']:.3f} of eager, "
            f"warm-up {compiled['warmup_s']:.0f} s"
        ),
        "lightning": lambda fit: f"Lightning fit: {json.dumps(fit['perf'])}",
    }
    for part, line in lines.items():
        print(f"{part}: failed: {result[part]['error']}" if "error" in result[part] else line(result[part]))


def _guarded(part: str, measure: Callable[[], dict[str, Any]], failed: list[str]) -> dict[str, Any]:
    """``measure()``, or its error: a check reports every part that fails, not only the first."""
    try:
        return measure()
    except Exception as error:
        traceback.print_exc()
        failed.append(part)
        return {"error": f"{type(error).__name__}: {error}"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every part; returns the result, after writing it (exits with status 1 if a part failed)."""
    args = parse_args(argv)
    started = time.perf_counter()
    report = environment_report()
    device_name = report["devices"][0]["name"] if report["devices"] else "cpu"
    peak = args.peak_tflops or peak_bf16_tflops(device_name)
    failed: list[str] = []
    result: dict[str, Any] = {
        "benchmark": "gpu_check",
        "environment": report,
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "peak_tflops": peak},
        "training": {
            family: _guarded(f"training/{family}", lambda family=family: measure_training(family, args, peak), failed)
            for family in FAMILIES
        },
        "moe_layer": _guarded("moe_layer", lambda: measure_moe_layer(args), failed),
        "sdmoe": _guarded("sdmoe", lambda: measure_sdmoe(args), failed),
        "compile": (
            _guarded("compile", lambda: measure_compile(args), failed)
            if args.compile
            else {"skipped": "no GPU; pass --compile to run it"}
        ),
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_fit_") as log_dir:
        result["lightning"] = _guarded("lightning", lambda: lightning_fit(args, peak, Path(log_dir)), failed)
    result["failed"] = failed
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print_table(result)
    write_result(result, args.out)
    if failed:
        print(f"gpu_check: {len(failed)} part(s) failed: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
