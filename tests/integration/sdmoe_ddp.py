"""SD-MoE training under data parallelism, for tests/integration/test_sdmoe_training.py (no tests here).

Two runners of the same few SD-MoE steps on the same global batches:

- :func:`spawn_ddp_run` / :func:`single_process_run`: plain ``torch.distributed`` (gloo, ``mp.spawn``) around
  a manual ``DistributedDataParallel``, no Lightning import in the workers, so two ranks start in seconds;
- ``python tests/integration/sdmoe_ddp.py OUT_DIR DEVICES``: :class:`PretrainModule` in a Lightning
  ``Trainer(devices=DEVICES, strategy="ddp")``; Lightning re-launches this script for rank 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.presets import tiny_qwen_moe
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import (
    SDMoEConfig,
    apply_spectral_decoupling,
    finish_optimizer_step,
    project_gradients,
    strict_update_reference,
)

# Both runners train in fp64 (the router and RoPE still compute in fp32): in fp32 the two reduction
# orders differ by rounding, and AdamW's first steps, ~lr·g/(|g| + eps), amplify that on entries whose
# gradient is near eps, which would need a tolerance loose enough to hide a real mismatch.
VOCAB = 64
SEQ = 16
GLOBAL_BATCH = 4
STEPS = 3
# Strict mode, a low-rank refresh after every step: every piece of SD-MoE state changes on every step.
SDMOE = SDMoEConfig(enabled=True, rank=4, refresh_every=1, strict=True, svd="lowrank")


def tiny_arch() -> TransformerConfig:
    """A tiny Qwen-style MoE whose loss is a mean over tokens, so DP-averaged gradients equal global ones.

    The micro-batch load-balancing loss is off: it is not a per-token mean (a product of two batch means),
    so half-batch values would not average to the full-batch value.
    """
    arch = tiny_qwen_moe()
    arch.n_layers, arch.vocab_size, arch.max_seq_len = 2, VOCAB, SEQ
    arch.moe.expert_hidden_dim = 48
    arch.moe.aux_loss_coef = 0.0
    return arch


def global_batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQ + 1) token blocks."""
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))


def _train(model: Transformer, wrapped: torch.nn.Module, batches: torch.Tensor) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for batch in batches:
        optimizer.zero_grad()
        out = wrapped(batch[:, :-1])
        (F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten()) + out.moe.loss).backward()
        project_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        reference = strict_update_reference(model)
        optimizer.step()
        finish_optimizer_step(model, reference)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _build(config: SDMoEConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_arch())
    apply_spectral_decoupling(model, config)
    return model.double()


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str, config: SDMoEConfig) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = _build(config)
        # Ranks draw different global random numbers (as with dropout); SD-MoE must not depend on them.
        torch.manual_seed(100 + rank)
        state = _train(model, DistributedDataParallel(model), global_batches()[:, rank::world_size])
        torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ddp_run(tmp_path: Path, world_size: int = 2, config: SDMoEConfig = SDMOE) -> list[dict[str, torch.Tensor]]:
    """Final state_dict of every rank after STEPS data-parallel SD-MoE steps."""
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path), config), nprocs=world_size)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


def single_process_run(config: SDMoEConfig = SDMOE) -> dict[str, torch.Tensor]:
    """Final state_dict after the same steps on the whole global batch in one process."""
    with _one_thread():
        model = _build(config)
        return _train(model, model, global_batches())


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run with one intra-op thread, as every rank does.

    LAPACK's SVD and QR round differently with other thread counts, and the spectral init turns that into
    ~1e-5 differences of singular vectors whose singular values nearly tie. Ranks always agree (DDP
    broadcasts rank 0's parameters and buffers); a one-process reference must match rank 0's setting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lightning_ddp_run(out_dir: Path, devices: int) -> None:
    """Train :class:`PretrainModule` for STEPS steps on ``devices`` CPU processes; each rank saves its state."""
    # Imported here only, so that the mp.spawn workers above start without Lightning (seconds per rank).
    import lightning as L
    from torch.utils.data import DataLoader

    from sdmoe_train.lightning.module import PretrainModule
    from sdmoe_train.lightning.optim import OptimConfig
    from tests.integration.trainers import quiet_cpu_trainer

    with _one_thread():
        L.seed_everything(0)
        module = PretrainModule(tiny_arch(), OptimConfig(lr=1e-3, warmup_steps=1, schedule="constant"), SDMOE)
        # Lightning starts rank 1 with LOCAL_RANK set; rank 0 (this script's first process) has none.
        rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.manual_seed(100 + rank)
        # Each rank takes its own rows of every global batch (Lightning's own DistributedSampler shuffles).
        loader = DataLoader(list(global_batches()[:, rank::devices].flatten(0, 1)), batch_size=GLOBAL_BATCH // devices)
        trainer = quiet_cpu_trainer(
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            max_steps=STEPS,
            gradient_clip_val=1.0,
            precision="64-true",
            use_distributed_sampler=False,
        )
        trainer.fit(module, train_dataloaders=loader)
    torch.save(module.model.state_dict(), out_dir / f"lightning_rank{trainer.global_rank}_of_{devices}.pt")


if __name__ == "__main__":
    lightning_ddp_run(Path(sys.argv[1]), int(sys.argv[2]))
