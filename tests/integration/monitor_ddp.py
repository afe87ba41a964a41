"""Monitoring callbacks in a two-process Lightning DDP run, for tests/integration/test_monitoring.py (no tests here).

``python tests/integration/monitor_ddp.py OUT_DIR``: 4 steps of :class:`PretrainModule` with every monitor at a
2-step interval, ranks fed different tokens; rank 0 logs to ``OUT_DIR/logs/metrics.csv`` and every rank saves
the routing counts of each of its micro-batches to ``OUT_DIR/counts_rank{R}.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from sdmoe_train.lightning.callbacks import (
    GateAlignmentMonitor,
    GradientAlignmentMonitor,
    RoutingHealthMonitor,
    SpectralOverlapMonitor,
)
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.moe.sdmoe import SDMoEConfig
from tests.integration.sdmoe_ddp import SEQ, VOCAB, tiny_arch
from tests.integration.trainers import quiet_cpu_trainer

STEPS = 4
BATCH = 2


class _CountRecorder(L.Callback):
    """Keeps each micro-batch's routing counts of this rank."""

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.counts.append(pl_module.last_routing.tokens_per_expert_LE.clone())


def run(out_dir: Path) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    L.seed_everything(0)
    module = PretrainModule(
        tiny_arch(), OptimConfig(lr=1e-3, warmup_steps=1, schedule="constant"), SDMoEConfig(enabled=True, rank=4)
    )
    # Lightning starts rank 1 with LOCAL_RANK set; rank 0 (this script's first process) has none.
    rank = int(os.environ.get("LOCAL_RANK", 0))
    tokens = torch.randint(0, VOCAB, (STEPS * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(10 + rank))
    recorder = _CountRecorder()
    trainer = quiet_cpu_trainer(
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        use_distributed_sampler=False,
        logger=L.pytorch.loggers.CSVLogger(out_dir, name="logs", version=""),
        callbacks=[
            RoutingHealthMonitor(every_n_steps=2),
            SpectralOverlapMonitor(every_n_steps=2, rank=4),
            GradientAlignmentMonitor(every_n_steps=2, window=2, rank=4, common_rank=4),
            GateAlignmentMonitor(every_n_steps=2, directions=4, probe_sequences=1),
            recorder,
        ],
    )
    trainer.fit(module, train_dataloaders=DataLoader(list(tokens), batch_size=BATCH))
    torch.save(torch.stack(recorder.counts), out_dir / f"counts_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]))
