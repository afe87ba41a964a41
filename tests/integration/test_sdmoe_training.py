"""SD-MoE inside training: PretrainModule wiring, vanilla equivalence, exact resume, DDP equals one process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.moe.sdmoe import MATRIX_TYPES, SDMoEConfig, decoupled_banks
from sdmoe_train.parallel.config import ParallelConfig
from tests.integration import sdmoe_ddp
from tests.integration.sdmoe_ddp import SEQ, VOCAB, tiny_arch
from tests.integration.trainers import cpu_trainer

# Constant after warmup: a cosine schedule's length follows trainer.max_steps, which differs between an
# interrupted run and its resumption.
OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, schedule="constant")


def _fixed_batch_loader(batch_size: int = 2) -> DataLoader:
    """One fixed batch per epoch: a resumed run then sees exactly the batches of an uninterrupted one."""
    blocks = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(list(blocks), batch_size=batch_size)


def _module(torch_seed: int = 0, **sdmoe: object) -> PretrainModule:
    torch.manual_seed(torch_seed)
    module = PretrainModule(tiny_arch(), OPTIM, SDMoEConfig(**sdmoe) if sdmoe else None)
    module.configure_model()
    return module


def test_disabled_sdmoe_is_exactly_the_vanilla_module() -> None:
    vanilla, disabled = _module(), _module(enabled=False)
    shapes = [(name, param.shape) for name, param in vanilla.named_parameters()]
    assert [(name, param.shape) for name, param in disabled.named_parameters()] == shapes
    assert sum(p.numel() for p in disabled.parameters()) == sum(p.numel() for p in vanilla.parameters())
    assert disabled.state_dict().keys() == vanilla.state_dict().keys()
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(disabled(tokens), vanilla(tokens))
    assert not decoupled_banks(disabled)


def test_enabled_sdmoe_swaps_every_routed_bank_and_nothing_else() -> None:
    vanilla, decoupled = _module(), _module(enabled=True, rank=4)
    assert len(decoupled_banks(decoupled)) == len(list(vanilla.model.moe_layers()))
    other = {n: p for n, p in vanilla.named_parameters() if ".experts." not in n}
    for name, param in decoupled.named_parameters():
        if ".experts." not in name:
            assert torch.equal(param, other.pop(name)), name
    assert not other


def test_trainer_steps_project_gradients_after_accumulation_and_keep_strict_unique_parts_complementary(
    tmp_path: Path,
) -> None:
    module = _module(enabled=True, rank=4, strict=True, refresh_every=100)
    trainer = cpu_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.5)
    trainer.fit(module, train_dataloaders=_fixed_batch_loader())
    for bank in decoupled_banks(module.model):
        for matrix in MATRIX_TYPES:
            _, unique, left, right = bank.parts(matrix)
            # Gradients are not zeroed until the next step: these are the ones the last update used.
            grad_scale = unique.grad.abs().max()
            assert grad_scale > 0
            assert (left.T @ unique.grad).abs().max() < 1e-5 * grad_scale
            assert (unique.grad @ right).abs().max() < 1e-5 * grad_scale
            assert (left.T @ unique).abs().max() < 1e-5 * unique.abs().max()
            assert (unique @ right).abs().max() < 1e-5 * unique.abs().max()
    assert trainer.logged_metrics["sdmoe/refresh_count"] == 0


def test_bases_refresh_every_refresh_every_optimizer_steps_in_training(tmp_path: Path) -> None:
    module = _module(enabled=True, rank=4, refresh_every=2)
    bank = decoupled_banks(module.model)[0]
    initial = bank.parts("up")[2].clone()
    trainer = cpu_trainer(tmp_path, max_steps=5, accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=_fixed_batch_loader())
    assert bank.steps == 5 and int(bank.optimizer_steps) == 5
    assert trainer.logged_metrics["sdmoe/refresh_count"] == 2
    common = bank.parts("up")[0].detach()
    left = bank.parts("up")[2]
    assert not torch.allclose(left, initial)
    # Refreshed at step 4 and trained one more step since: close to, not equal to, W_c's current bases.
    svd_left = torch.linalg.svd(common).U[:, :4]
    assert (left @ left.T - svd_left @ svd_left.T).abs().max() < 0.5


@pytest.mark.parametrize(
    "options", [{}, {"reproject_unique": True, "bases_from": "experts"}], ids=["paper", "tracking"]
)
def test_resume_mid_refresh_interval_reproduces_the_uninterrupted_run(tmp_path: Path, options: dict) -> None:
    sdmoe = {"enabled": True, "rank": 4, "refresh_every": 3, "strict": True, **options}
    straight = _module(**sdmoe)
    cpu_trainer(tmp_path / "straight", max_steps=7).fit(straight, train_dataloaders=_fixed_batch_loader())

    first = _module(**sdmoe)
    trainer = cpu_trainer(tmp_path / "first", max_steps=4)
    trainer.fit(first, train_dataloaders=_fixed_batch_loader())
    checkpoint = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = _module(torch_seed=1, **{**sdmoe, "seed": 1})  # resuming must not depend on the fresh init
    cpu_trainer(tmp_path / "resumed", max_steps=7).fit(
        resumed, train_dataloaders=_fixed_batch_loader(), ckpt_path=checkpoint
    )

    expected = straight.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert decoupled_banks(resumed.model)[0].steps == 7


def test_load_from_checkpoint_restores_the_decoupled_model(tmp_path: Path) -> None:
    module = _module(enabled=True, rank=4, refresh_every=2)
    trainer = cpu_trainer(tmp_path, max_steps=3)
    trainer.fit(module, train_dataloaders=_fixed_batch_loader())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = PretrainModule.load_from_checkpoint(tmp_path / "model.ckpt")
    assert restored.sdmoe == module.sdmoe
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(restored(tokens), module(tokens))


@pytest.mark.parametrize("option", ["strict", "reproject_unique"])
def test_options_that_edit_unique_parts_after_the_step_are_refused_under_deepspeed(
    monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    module = _module(enabled=True, rank=4, **{option: True})
    # ZeRO's own fp32 master weights would overwrite the edit at the next step; no DeepSpeed install needed.
    monkeypatch.setattr("sdmoe_train.lightning.module.uses_deepspeed", lambda trainer: True)
    module._trainer = SimpleNamespace()
    with pytest.raises(ConfigError, match=rf"model\.sdmoe\.{option}=true is not supported with the DeepSpeed"):
        module.configure_model()
    paper = _module(enabled=True, rank=4)
    paper._trainer = SimpleNamespace()
    paper.configure_model()  # the paper's setting projects in backward hooks instead
    assert paper._gradients_projected_in_backward


def test_bases_from_the_experts_is_refused_with_expert_parallelism() -> None:
    with pytest.raises(ConfigError, match="model.sdmoe.bases_from=experts with model.parallel.ep_size=2"):
        PretrainModule(
            tiny_arch(),
            OPTIM,
            SDMoEConfig(enabled=True, rank=4, bases_from="experts"),
            None,
            ParallelConfig(ep_size=2),
        )


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(actual[name], tensor), name


# The options that re-project W_u and take the bases from all experts' proxies average over the experts at every
# refresh: every rank must compute the same bases and fold identically.
@pytest.mark.parametrize(
    "options", [{}, {"reproject_unique": True, "bases_from": "experts"}], ids=["paper", "tracking"]
)
def test_two_process_ddp_sdmoe_steps_equal_one_process_on_the_global_batch(tmp_path: Path, options: dict) -> None:
    config = dataclasses.replace(sdmoe_ddp.SDMOE, **options)
    ranks = sdmoe_ddp.spawn_ddp_run(tmp_path, config=config)
    single = sdmoe_ddp.single_process_run(config)
    for state in ranks:
        _assert_same_state(state, single, atol=1e-6)
    assert any("left_basis" in name for name in single)


@pytest.mark.slow
def test_lightning_ddp_sdmoe_run_equals_the_single_device_run(tmp_path: Path) -> None:
    script = Path(sdmoe_ddp.__file__)
    root = script.parents[2]
    # PYTHONPATH: both ranks import this checkout's sdmoe_train, as the in-process reference run does.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(script), str(tmp_path), "2"], check=True, cwd=root, env=env, timeout=300)
    sdmoe_ddp.lightning_ddp_run(tmp_path, devices=1)
    single = torch.load(tmp_path / "lightning_rank0_of_1.pt")
    for rank in range(2):
        _assert_same_state(torch.load(tmp_path / f"lightning_rank{rank}_of_2.pt"), single, atol=1e-6)
