"""PerformanceMonitor in a real Trainer: tokens/s, TFLOPS and MFU per device every N steps; the peak table."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.callbacks import PerformanceMonitor
from sdmoe_train.lightning.callbacks.throughput import peak_bf16_tflops
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.models.flops import training_flops_per_token
from sdmoe_train.models.presets import tiny_qwen_moe
from tests.integration.trainers import cpu_trainer

VOCAB, SEQ, BATCH = 64, 16, 2


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny tensors: a second intra-op thread only adds contention (up to 40x slower on a loaded 2-core machine)."""
    torch.set_num_threads(1)


def _module() -> PretrainModule:
    arch = tiny_qwen_moe()
    arch.vocab_size, arch.n_layers, arch.max_seq_len = VOCAB, 2, SEQ
    return PretrainModule(arch, OptimConfig(warmup_steps=1, schedule="constant"))


def _fit(tmp_path: Path, monitor: PerformanceMonitor, steps: int, accumulate: int = 1) -> dict[int, dict[str, float]]:
    blocks = torch.randint(0, VOCAB, (steps * accumulate * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    trainer = cpu_trainer(tmp_path, steps, callbacks=[monitor], accumulate_grad_batches=accumulate)
    trainer.fit(_module(), train_dataloaders=DataLoader(list(blocks), batch_size=BATCH))
    rows: dict[int, dict[str, float]] = {}
    with open(tmp_path / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            values = {key: float(value) for key, value in row.items() if key.startswith("perf/") and value}
            if values:
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def test_throughput_is_logged_every_n_steps_without_mfu_on_cpu(tmp_path: Path) -> None:
    rows = _fit(tmp_path, PerformanceMonitor(every_n_steps=2), steps=5, accumulate=2)
    assert sorted(rows) == [2, 4]
    flops_per_token = training_flops_per_token(_module().arch, SEQ).total
    for values in rows.values():
        assert set(values) == {"perf/tokens_per_sec_per_device", "perf/tflops_per_device"}  # no peak on CPU
        assert values["perf/tokens_per_sec_per_device"] > 0
        expected_tflops = values["perf/tokens_per_sec_per_device"] * flops_per_token / 1e12
        assert values["perf/tflops_per_device"] == pytest.approx(expected_tflops, rel=1e-6)


def test_mfu_is_tflops_over_the_peak_set_in_the_recipe(tmp_path: Path) -> None:
    rows = _fit(tmp_path, PerformanceMonitor(every_n_steps=1, peak_tflops=0.5), steps=3)
    assert sorted(rows) == [1, 2, 3]
    for values in rows.values():
        assert values["perf/mfu"] == pytest.approx(values["perf/tflops_per_device"] / 0.5, rel=1e-6)


@pytest.mark.gpu
def test_peak_memory_is_logged_every_step_on_a_gpu(tmp_path: Path) -> None:
    blocks = torch.randint(0, VOCAB, (3 * BATCH, SEQ + 1))
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=3,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[PerformanceMonitor(every_n_steps=3)],
    )
    trainer.fit(_module(), train_dataloaders=DataLoader(list(blocks), batch_size=BATCH))
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    memory = [float(row["perf/peak_memory_gib"]) for row in rows if row.get("perf/peak_memory_gib")]
    assert len(memory) == 3 and all(value > 0 for value in memory)
    assert any(row.get("perf/mfu") for row in rows) == (peak_bf16_tflops(torch.cuda.get_device_name()) is not None)


@pytest.mark.parametrize(
    ("device_name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", 181.05),
        ("NVIDIA L4", 121.0),
        ("NVIDIA B200", 2250.0),
        ("AMD Instinct MI300X", 1307.4),
        ("NVIDIA GeForce RTX 3090", None),
        ("cpu", None),
    ],
)
def test_peak_bf16_flops_are_looked_up_by_device_name(device_name: str, tflops: float | None) -> None:
    assert peak_bf16_tflops(device_name) == tflops


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"peak_tflops": 0.0}, {"peak_tflops": -3.0}])
def test_bad_settings_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="PerformanceMonitor"):
        PerformanceMonitor(**kwargs)


def test_a_module_without_a_token_count_is_refused_at_setup(tmp_path: Path) -> None:
    module = _module()
    del module.tokens_seen
    with pytest.raises(ConfigError, match="PerformanceMonitor needs a LightningModule with tokens_seen"):
        PerformanceMonitor().setup(cpu_trainer(tmp_path, 1), module, "fit")
