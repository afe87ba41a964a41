"""PretrainModule under MoEDeepSpeedStrategy on CPU processes, for tests/integration/test_deepspeed.py.

``python tests/integration/deepspeed_runs.py OUT_DIR --devices 2 --stage 2 --ep_size 2 --steps 4 ...``
trains the tiny SD-MoE model of the DDP tests on fixed global batches; Lightning re-launches the script for
rank 1. Every rank writes the logits of fixed evaluation tokens before the first and after the last step
(``start_logits_rankR.pt``, ``end_logits_rankR.pt``) and the run ends with a checkpoint directory
``OUT_DIR/final``. ``--devices 1 --strategy auto`` is the single-device reference.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.moe.sdmoe import SDMoEConfig
from sdmoe_train.parallel.config import ParallelConfig
from sdmoe_train.parallel.deepspeed import MoEDeepSpeedStrategy
from tests.integration.sdmoe_ddp import GLOBAL_BATCH, SEQ, VOCAB, global_batches, tiny_arch
from tests.integration.trainers import quiet_cpu_trainer

# eps = 1 turns AdamW into (nearly) momentum SGD for small gradients: a wrongly scaled expert gradient then
# shows in the weights instead of being normalised away.
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1, schedule="constant", eps=1.0)
SDMOE = SDMoEConfig(enabled=True, rank=4, refresh_every=2, svd="full")


def evaluation_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def planted_value(layer: int, matrix: int, expert: int) -> float:
    """A distinct small constant for every (layer, matrix, expert): any mix-up changes some value."""
    return 1e-3 * (100 * layer + 10 * matrix + expert + 1)


def plant_expert_values(module: PretrainModule) -> None:
    """Fill expert e of every stacked bank with its own constant (before any sharding)."""
    with torch.no_grad():
        for layer, moe in module.model.moe_layers():
            per_expert = [param for param in moe.experts.parameters(recurse=False) if param.dim() == 3]
            for matrix, bank in enumerate(per_expert):
                for expert in range(bank.shape[0]):
                    bank[expert].fill_(planted_value(layer, matrix, expert))


class _RecordLogits(L.Callback):
    def __init__(self, out_dir: Path, save_at_start: bool) -> None:
        self.out_dir = out_dir
        self.save_at_start = save_at_start

    def _save(self, trainer: L.Trainer, module: PretrainModule, name: str) -> None:
        # Every rank runs the forward: under expert parallelism the all-to-all needs all of them.
        was_training = module.training
        module.eval()
        with torch.no_grad():
            logits = module(evaluation_tokens())
        module.train(was_training)
        torch.save(logits, self.out_dir / f"{name}_logits_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: L.Trainer, module: PretrainModule) -> None:
        self._save(trainer, module, "start")
        if self.save_at_start:
            trainer.save_checkpoint(self.out_dir / "start")

    def on_train_end(self, trainer: L.Trainer, module: PretrainModule) -> None:
        self._save(trainer, module, "end")


def run(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    L.seed_everything(0)
    arch = tiny_arch()
    arch.moe.bias_update_rate = 1e-3  # the bias must stay identical on every rank
    module = PretrainModule(
        arch,
        OPTIM,
        SDMOE if args.sdmoe else None,
        init_from=args.init_from,
        parallel=ParallelConfig(ep_size=args.ep_size),
    )
    if args.plant:
        module.configure_model()  # every expert, on the CPU; `fit` shards the planted weights afterwards
        plant_expert_values(module)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    # Each rank takes its own rows of every global batch, so all layouts see the same global batches.
    batches = global_batches()[: 1 if args.one_batch else None]
    loader = DataLoader(list(batches[:, rank :: args.devices].flatten(0, 1)), batch_size=GLOBAL_BATCH // args.devices)
    strategy = "auto" if args.stage is None else MoEDeepSpeedStrategy(stage=args.stage)
    trainer = quiet_cpu_trainer(
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        precision="32-true",
        use_distributed_sampler=False,
        callbacks=[_RecordLogits(out_dir, save_at_start=args.plant)],
    )
    trainer.fit(module, train_dataloaders=loader, ckpt_path=args.resume)
    trainer.save_checkpoint(out_dir / "final")
    if args.stage is None:
        torch.save(module.model.state_dict(), out_dir / "single_device_state.pt")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--stage", type=int, default=None, help="ZeRO stage; omit for the single-device reference")
    parser.add_argument("--ep_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sdmoe", action="store_true")
    parser.add_argument("--plant", action="store_true", help="plant per-expert constants, checkpoint at start")
    parser.add_argument("--init_from", default=None)
    parser.add_argument("--resume", default=None)
    # Lightning replays a plain DataLoader from its start on resume; one batch per epoch makes that exact.
    parser.add_argument("--one_batch", action="store_true", help="the same global batch at every step")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(parse())
