"""The evidence study's MechanismProbe inside a real (tiny) training run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from evidence_probe import MechanismProbe
from torch.utils.data import DataLoader

from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.moe.sdmoe import SDMoEConfig
from tests.integration.sdmoe_ddp import SEQ, VOCAB, tiny_arch
from tests.integration.trainers import cpu_trainer


def _fit(tmp_path: Path, sdmoe: SDMoEConfig | None, steps: int = 4) -> dict[str, list[tuple[int, float]]]:
    torch.manual_seed(0)
    module = PretrainModule(tiny_arch(), OptimConfig(lr=1e-2, warmup_steps=1, schedule="constant"), sdmoe)
    blocks = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(0))
    probe = MechanismProbe(every_n_steps=2, ranks=[2, 4], removed_ranks=[2], rank=2)
    cpu_trainer(tmp_path, max_steps=steps, callbacks=[probe]).fit(module, DataLoader(list(blocks), batch_size=2))
    series: dict[str, list[tuple[int, float]]] = {}
    with (tmp_path / "metrics.csv").open() as stream:
        for row in csv.DictReader(stream):
            for name, value in row.items():
                if name.startswith("probe/") and value:
                    series.setdefault(name, []).append((int(row["step"]), float(value)))
    return series


@pytest.mark.parametrize("strict", [False, True], ids=["paper", "strict"])
def test_probe_measures_the_refresh_cycle_of_sdmoe(tmp_path: Path, strict: bool) -> None:
    sdmoe = SDMoEConfig(enabled=True, rank=4, refresh_every=2, strict=strict)
    series = _fit(tmp_path, sdmoe)
    # Refreshes after steps 2 and 4: the step before each (1, 3) is measured, then the refresh step itself.
    assert [step for step, _ in series["probe/refresh/update_share"]] == [1, 3]
    assert [step for step, _ in series["probe/refresh/leakage_post_refresh_share"]] == [2, 4]
    assert all(value < 1e-10 for _, value in series["probe/refresh/projected_gradient_share"])
    assert all(value > 0.05 for _, value in series["probe/refresh/raw_gradient_share"])
    update = max(value for _, value in series["probe/refresh/update_share"])
    # AdamW's elementwise normalisation moves the update into the common subspace unless strict projects it.
    assert update < 1e-10 if strict else update > 0.01
    assert [step for step, _ in series["probe/unique/overlap_r2_d"]] == [0, 2, 4]
    assert series["probe/unique/leakage"][0] == (0, pytest.approx(0.0, abs=1e-10))


def test_probe_measures_the_vanilla_experts_without_refresh_cycles(tmp_path: Path) -> None:
    series = _fit(tmp_path, None)
    assert not any(name.startswith(("probe/refresh/", "probe/unique/")) for name in series)
    assert [step for step, _ in series["probe/proxy/residual_overlap_k2_d"]] == [0, 2, 4]
    assert all(0.0 <= value <= 1.0 for _, value in series["probe/proxy/overlap_r4_f"])
