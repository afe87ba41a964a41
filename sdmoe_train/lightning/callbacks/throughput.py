"""Throughput as GPU users measure it: tokens/s, model TFLOPS and MFU per device, peak memory per step.

Every ``every_n_steps`` optimizer steps :class:`PerformanceMonitor` logs, over the steps since its last log:

- ``perf/tokens_per_sec_per_device``: training tokens per second on one device (global tokens / world size);
- ``perf/tflops_per_device``: those tokens times :func:`~sdmoe_train.models.flops.training_flops_per_token`
  (model FLOPs: forward + backward, no activation-checkpointing recompute), in TFLOPS;
- ``perf/mfu``: that over the device's peak (model FLOPs utilisation, 0-1), when a peak is known: the
  ``peak_tflops`` argument, else the dense bf16 peak of the CUDA/ROCm device looked up by name
  (:data:`PEAK_BF16_TFLOPS`). CPUs have no entry, so on CPU MFU is logged only with ``peak_tflops`` set.

and after every optimizer step on GPUs ``perf/peak_memory_gib``: the most memory the CUDA caching allocator
held for tensors during that step (``torch.cuda.max_memory_allocated``, reset after each step).

Values are rank 0's (in synchronous data-parallel training every rank runs the same steps; with expert
parallelism a device also runs other ranks' tokens through its experts, which balanced routing evens out).
The first window includes the first steps' warm-up (``torch.compile``, allocator growth). Scalars go to every
logger at ``step = trainer.global_step``, like the monitoring callbacks. Lightning's own ``ThroughputMonitor``
is not used: it needs FLOPs per batch up front and its device table names sparse peaks for some chips and
misses others (H200 by its reported name, L40S, MI300X).
"""

from __future__ import annotations

import re
import time
from typing import Any

import lightning as L
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.contract import training_module
from sdmoe_train.models.flops import training_flops_per_token

GIB = 2**30

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    # NVIDIA data sheets give Tensor Core peaks "with sparsity"; these are the dense halves.
    (r"\bh100\b.*\bpcie\b", 756.0),  # H100 PCIe: 1,513 sparse
    (r"\bh100\b.*\bnvl\b", 835.5),  # H100 NVL: 1,671 sparse
    (r"\bh100\b", 989.4),  # H100 SXM5 ("NVIDIA H100 80GB HBM3"): 1,979 sparse
    (r"\bh200\b.*\bnvl\b", 835.5),  # H200 NVL: 1,671 sparse
    (r"\bh200\b", 989.4),  # H200 SXM: 1,979 sparse
    (r"\bgh200\b", 989.4),  # Grace Hopper: the H100/H200 SXM GPU
    (r"\bb200\b", 2250.0),  # B200 (HGX): 4.5 PFLOPS sparse
    (r"\ba100\b", 312.0),  # A100 SXM4 and PCIe, 40 and 80 GB: 624 sparse
    (r"\bl40s\b", 362.05),  # L40S: 733 sparse
    (r"\bl40\b", 181.05),  # L40: 362.1 sparse
    (r"\bl4\b", 121.0),  # L4: 242 sparse
    (r"\ba10\b", 125.0),  # A10: 250 sparse
    # AMD data sheets give dense peaks.
    (r"\bmi300x\b|\bmi325x\b", 1307.4),  # Instinct MI300X / MI325X
    (r"\bmi250x\b", 383.0),  # Instinct MI250X
)
"""(regular expression on the lower-cased device name, dense bf16 peak in TFLOPS), first match wins."""


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 Tensor Core peak of an accelerator named like ``torch.cuda.get_device_name``, or None."""
    name = device_name.lower()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


class PerformanceMonitor(L.Callback):
    """Logs tokens/s, TFLOPS and MFU per device every N optimizer steps, and peak GPU memory every step.

    Args:
        every_n_steps: optimizer steps per throughput measurement.
        peak_tflops: the per-device peak MFU divides by, in TFLOPS, for the precision trained in; None looks
            CUDA/ROCm devices up by name (dense bf16) and logs no MFU where that fails (CPUs, unknown GPUs).
    """

    def __init__(self, every_n_steps: int = 10, peak_tflops: float | None = None) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"PerformanceMonitor.every_n_steps={every_n_steps} must be >= 1")
        if peak_tflops is not None and not peak_tflops > 0:
            raise ConfigError(f"PerformanceMonitor.peak_tflops={peak_tflops} must be > 0 (or null to look it up)")
        self.every_n_steps = every_n_steps
        self.peak_tflops = peak_tflops
        self._device: torch.device = torch.device("cpu")
        self._peak: float | None = None
        self._flops_per_token: dict[int, int] = {}
        self._last_step = -1
        self._window_step = 0
        self._window_tokens = 0
        self._window_start = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        training_module(pl_module, type(self).__name__)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = trainer.strategy.root_device
        self._peak = self.peak_tflops
        if self._peak is None and self._device.type == "cuda":
            self._peak = peak_bf16_tflops(torch.cuda.get_device_name(self._device))
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self._last_step = trainer.global_step
        self._start_window(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # inside gradient accumulation: no optimizer step finished
        self._last_step = trainer.global_step
        metrics: dict[str, float] = {}
        if self._device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self._device) / GIB
            torch.cuda.reset_peak_memory_stats(self._device)
        if trainer.global_step - self._window_step >= self.every_n_steps:
            metrics.update(self._throughput(trainer, pl_module, _sequence_length(batch, trainer)))
            self._start_window(trainer, pl_module)
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _start_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_step = trainer.global_step
        self._window_tokens = training_module(pl_module, type(self).__name__).tokens_seen
        self._window_start = self._now()

    def _throughput(self, trainer: L.Trainer, pl_module: L.LightningModule, seq_len: int) -> dict[str, float]:
        module = training_module(pl_module, type(self).__name__)
        elapsed = max(self._now() - self._window_start, 1e-9)
        tokens_per_device = (module.tokens_seen - self._window_tokens) / trainer.world_size
        tokens_per_sec = tokens_per_device / elapsed
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = training_flops_per_token(module.model.config, seq_len).total
        tflops = tokens_per_sec * self._flops_per_token[seq_len] / 1e12
        metrics = {"perf/tokens_per_sec_per_device": tokens_per_sec, "perf/tflops_per_device": tflops}
        if self._peak is not None:
            metrics["perf/mfu"] = tflops / self._peak
        return metrics

    def _now(self) -> float:
        # Kernels run asynchronously; wait for them so the window ends where its work ends (once per window).
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()


def _sequence_length(batch: Any, trainer: L.Trainer) -> int:
    """Tokens per training sequence: a batch of (B, S + 1) token blocks predicts S tokens per row."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[-1] - 1
    corpus = getattr(getattr(trainer, "datamodule", None), "corpus", None)
    if corpus is None:
        raise ConfigError("PerformanceMonitor needs token batches of shape (B, S + 1) or a data module with `corpus`")
    return corpus.seq_len
