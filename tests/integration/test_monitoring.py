"""Monitoring callbacks inside training: logged keys, SD-MoE gradients, activation checkpointing, resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.callbacks import (
    GateAlignmentMonitor,
    GradientAlignmentMonitor,
    RoutingHealthMonitor,
    SpectralOverlapMonitor,
)
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.moe.sdmoe import SDMoEConfig
from sdmoe_train.moe.ssmoe_router import SSMoEConfig
from sdmoe_train.report.figures import FIGURES_FILE
from tests.integration import monitor_ddp
from tests.integration.sdmoe_ddp import SEQ, VOCAB, tiny_arch
from tests.integration.trainers import quiet_cpu_trainer

OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, schedule="constant")
BATCH = 4


def _loader(batches: int = 3) -> DataLoader:
    """Fixed batches; with one batch per epoch a resumed run sees the batches of an uninterrupted one."""
    blocks = torch.randint(0, VOCAB, (batches * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(list(blocks), batch_size=BATCH)


def _monitors(every: int = 2, window: int = 2) -> list[L.Callback]:
    return [
        RoutingHealthMonitor(every_n_steps=every),
        SpectralOverlapMonitor(every_n_steps=every, rank=4),
        GradientAlignmentMonitor(every_n_steps=every, window=window, rank=4, common_rank=4),
        GateAlignmentMonitor(every_n_steps=every, directions=4, probe_sequences=2),
    ]


def _fit(
    tmp_path: Path,
    module: PretrainModule,
    max_steps: int,
    callbacks: list[L.Callback],
    ckpt_path: Path | None = None,
    batches: int = 3,
    **trainer_kwargs: object,
) -> L.Trainer:
    trainer = quiet_cpu_trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs", version=""),
        log_every_n_steps=50,  # the monitors must not depend on it
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=_loader(batches), ckpt_path=ckpt_path)
    return trainer


def _module(**sdmoe: object) -> PretrainModule:
    torch.manual_seed(0)
    return PretrainModule(tiny_arch(), OPTIM, SDMoEConfig(**sdmoe) if sdmoe else None)


def _logged(log_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.csv as step -> {metric: value} (rows of the same step merged)."""
    rows: dict[int, dict[str, float]] = {}
    with (log_dir / "metrics.csv").open() as stream:
        for row in csv.DictReader(stream):
            values = {key: float(value) for key, value in row.items() if value not in ("", None) and key != "step"}
            rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def test_all_monitors_log_their_keys_every_interval_through_the_csv_logger(tmp_path: Path) -> None:
    _fit(tmp_path, _module(enabled=True, rank=4), max_steps=4, callbacks=_monitors())
    logged = _logged(tmp_path / "logs")
    for step in (2, 4):
        metrics = logged[step]
        for key in (
            "routing/load_entropy/layer_00",
            "routing/dead_expert_fraction",
            "routing/load_fraction/layer_01/expert_07",
            "routing/bias/layer_00/expert_00",
            "routing/z_loss/layer_01",
            "spectral/proxy_gate_left_overlap_mean/layer_00",
            "spectral/unique_down_right_overlap_max/layer_01",
            "spectral/unique_overlap_mean",
            "gradient/up_left_alignment_mean/layer_01",
            "gradient/common_energy_share",
            "gate/hidden_top1_share/layer_00",
            "gate/experts_captured",
        ):
            assert key in metrics, (step, key)
        assert metrics["gradient/window_steps"] == 2
        assert 0 < metrics["routing/load_entropy"] <= 1
        assert sum(metrics[f"routing/load_fraction/layer_00/expert_{e:02d}"] for e in range(8)) == pytest.approx(1)
        assert 0 <= metrics["spectral/unique_overlap_mean"] <= 1
    assert 1 not in logged or "routing/load_entropy" not in logged[1]
    figures = [json.loads(line) for line in (tmp_path / "logs" / FIGURES_FILE).read_text().splitlines()]
    names = {(figure["step"], figure["name"]) for figure in figures}
    assert (4, "spectral/unique_gate/layer_00") in names
    assert (4, "gate/hidden_alignment/layer_01") in names
    assert (2, "routing/load_fraction/layer_01") in names
    heatmap = next(f for f in figures if f["name"] == "gradient/alignment_down/layer_01")
    assert len(heatmap["values"]) == 8 and all(len(row) == 8 for row in heatmap["values"])


def test_routing_monitor_logs_the_ssmoe_diagnostics_of_spectral_routers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PretrainModule(tiny_arch(), OPTIM, ssmoe=SSMoEConfig(enabled=True, c=0.5))
    _fit(tmp_path, module, max_steps=2, callbacks=[RoutingHealthMonitor(every_n_steps=2)])
    metrics = _logged(tmp_path / "logs")[2]
    for layer in ("layer_00", "layer_01"):
        assert 0 < metrics[f"routing/ssmoe_spectral_entropy/{layer}"] <= 1
        assert 0 <= metrics[f"routing/ssmoe_changed_share/{layer}"] <= 1
        assert -1 <= metrics[f"routing/ssmoe_row_cos_mean/{layer}"] <= 1


def test_routing_monitor_logs_no_ssmoe_diagnostics_for_learned_routers(tmp_path: Path) -> None:
    _fit(tmp_path, _module(), max_steps=2, callbacks=[RoutingHealthMonitor(every_n_steps=2)])
    assert not [key for key in _logged(tmp_path / "logs")[2] if "ssmoe" in key]


def test_sdmoe_unique_parts_start_orthogonal_to_the_common_subspace_and_gradients_are_read_unprojected(
    tmp_path: Path,
) -> None:
    _fit(tmp_path, _module(enabled=True, rank=4, refresh_every=100), max_steps=2, callbacks=_monitors())
    metrics = _logged(tmp_path / "logs")[2]
    # After projection every unique gradient would have no energy in the common subspace; autograd's has some.
    assert metrics["gradient/common_energy_share"] > 1e-3
    # Proxies share the rank-4 common part W_c, the unique parts do not.
    assert metrics["spectral/proxy_overlap_mean"] > 2 * metrics["spectral/unique_overlap_mean"]


def test_layer_subset_limits_what_is_logged_and_bad_settings_fail_early(tmp_path: Path) -> None:
    _fit(tmp_path, _module(), max_steps=2, callbacks=[SpectralOverlapMonitor(every_n_steps=2, layers=[1], rank=4)])
    metrics = _logged(tmp_path / "logs")[2]
    assert "spectral/proxy_up_left_overlap_mean/layer_01" in metrics
    assert not any(key.endswith("layer_00") for key in metrics)
    assert not any(key.startswith("spectral/unique") for key in metrics)  # vanilla model: no unique parts
    with pytest.raises(ConfigError, match=r"layers=\[5\]"):
        _fit(tmp_path, _module(), max_steps=1, callbacks=[RoutingHealthMonitor(layers=[5])])
    with pytest.raises(ConfigError, match="rank=48"):
        _fit(tmp_path, _module(), max_steps=1, callbacks=[SpectralOverlapMonitor(rank=48)])
    with pytest.raises(ConfigError, match="window=5"):
        GradientAlignmentMonitor(every_n_steps=4, window=5)
    with pytest.raises(ConfigError, match="every_n_steps=0"):
        GateAlignmentMonitor(every_n_steps=0)


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute every block's forward in the backward pass (activation checkpointing)."""
    for block in model.blocks:
        block.forward = lambda x_BSD, cos, sin, mask=None, forward=block.forward, **kwargs: checkpoint(
            forward, x_BSD, cos, sin, mask, use_reentrant=False, **kwargs
        )


def test_activation_checkpointing_does_not_double_count_routed_tokens(tmp_path: Path) -> None:
    module = _module()
    _checkpoint_blocks(module.model)
    router_calls = []
    for _, layer in module.model.moe_layers():
        layer.router.register_forward_hook(lambda *_: router_calls.append(1))
    monitor = RoutingHealthMonitor(every_n_steps=100)
    steps, accumulate = 3, 2
    _fit(tmp_path, module, max_steps=steps, callbacks=[monitor], accumulate_grad_batches=accumulate)
    micro_batches = monitor.state_dict()["micro_batches"]
    assert micro_batches > steps  # 3 batches per epoch: the epoch end flushes a partial accumulation
    assert len(router_calls) == 2 * 2 * micro_batches, "the forward was not recomputed: no checkpointing in effect"
    counts_LE = monitor.state_dict()["counts_LE"]
    top_k = tiny_arch().moe.top_k
    assert counts_LE.sum(dim=-1).tolist() == [micro_batches * BATCH * SEQ * top_k] * 2


def test_monitor_state_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    # Intervals of 3 steps with a 2-step gradient window: the interrupted run stops at step 2, in the middle of
    # the routing interval and of the gradient window, and after the probe batch was taken. One batch per epoch:
    # a plain DataLoader restarts its epoch on resume.
    straight = _fit(tmp_path / "straight", _module(enabled=True, rank=4), 3, _monitors(every=3), batches=1)
    interrupted = _fit(tmp_path / "first", _module(enabled=True, rank=4), 2, _monitors(every=3), batches=1)
    interrupted.save_checkpoint(tmp_path / "step2.ckpt")
    saved = torch.load(tmp_path / "step2.ckpt", weights_only=False)["callbacks"]
    assert saved["GradientAlignmentMonitor"]["steps_summed"] == 1
    assert saved["RoutingHealthMonitor"]["micro_batches"] == 2
    assert saved["GateAlignmentMonitor"]["probe_BS"].shape == (2, SEQ)
    assert saved["SpectralOverlapMonitor"]["published_step"] == -1

    torch.manual_seed(1)  # the resumed run must not depend on its own fresh state
    resumed_monitors = _monitors(every=3)
    resumed = _module(enabled=True, rank=4)
    _fit(tmp_path / "resumed", resumed, 3, resumed_monitors, ckpt_path=tmp_path / "step2.ckpt", batches=1)
    expected = _logged(tmp_path / "straight" / "logs")[3]
    actual = _logged(tmp_path / "resumed" / "logs")[3]
    monitored = [key for key in expected if key.split("/")[0] in ("routing", "spectral", "gradient", "gate")]
    assert len(monitored) > 100
    for key in monitored:
        assert actual[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert straight.global_step == 3


def test_with_wandb_the_monitors_log_scalars_and_svg_heatmap_panels_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    wandb.finish()  # WandbLogger would otherwise reuse a run an earlier test left open
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = L.pytorch.loggers.WandbLogger(project="monitor-test", save_dir=str(tmp_path), offline=True)
    trainer = quiet_cpu_trainer(max_steps=2, logger=logger, callbacks=_monitors(every=2))
    trainer.fit(_module(enabled=True, rank=4), train_dataloaders=_loader())
    logger.experiment.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media" / "html"
    panels = sorted(str(path.relative_to(media)) for path in media.rglob("*.html"))
    assert any(name.startswith("spectral_figures/unique_gate/layer_00_") for name in panels), panels[:5]
    assert any(name.startswith("gate_figures/hidden_alignment/layer_01_") for name in panels), panels[:5]
    assert any(name.startswith("routing_figures/load_fraction/layer_00_") for name in panels), panels[:5]
    assert "<svg" in next(media.rglob("*.html")).read_text()
    (records,) = run_dir.glob("run-*.wandb")  # the offline log `wandb sync` uploads later
    assert b"spectral/unique_overlap_mean" in records.read_bytes()
    assert b"routing/load_entropy/layer_01" in records.read_bytes()


@pytest.mark.slow
def test_two_process_ddp_run_logs_routing_loads_summed_over_ranks_from_rank_zero(tmp_path: Path) -> None:
    script = Path(monitor_ddp.__file__)
    root = script.parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    # A deadlock (ranks disagreeing on a collective) would show as a timeout here.
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, cwd=root, env=env, timeout=300)
    counts_RSLE = torch.stack([torch.load(tmp_path / f"counts_rank{rank}.pt") for rank in range(2)])
    assert not torch.equal(counts_RSLE[0], counts_RSLE[1]), "the ranks should see different tokens"
    logged = _logged(tmp_path / "logs")
    for step in (2, 4):
        window_LE = counts_RSLE[:, step - 2 : step].sum(dim=(0, 1)).double()
        expected_LE = window_LE / window_LE.sum(dim=-1, keepdim=True)
        for layer in range(2):
            for expert in range(8):
                key = f"routing/load_fraction/layer_{layer:02d}/expert_{expert:02d}"
                assert logged[step][key] == pytest.approx(expected_LE[layer, expert].item(), abs=1e-6), (step, key)
        for layer in range(2):
            assert logged[step][f"routing/token_copies/layer_{layer:02d}"] == window_LE[layer].sum().item()
        assert "gate/hidden_top1_share" in logged[step] and "gradient/alignment_mean" in logged[step]
