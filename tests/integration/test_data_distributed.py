"""PretrainDataModule on two gloo ranks (Lightning ddp_spawn on CPU): sharding and per-rank stream resume.

Each run spawns two processes that import torch, lightning and datasets, so a run takes several
seconds; the tests are marked slow.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sdmoe_train.data.config import DataConfig
from sdmoe_train.data.datamodule import PretrainDataModule
from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.data.sampler import ResumableDistributedSampler
from tests.corpora import make_config, make_documents, make_mixture, make_tokenizer, write_documents
from tests.integration.trainers import quiet_cpu_trainer

pytestmark = pytest.mark.slow

BATCH = 4


class RankRecorder(L.LightningModule):
    """Saves the batches each rank trained on to `<out>/<tag>_rank<r>.pt`, and optionally a checkpoint."""

    def __init__(self, out: Path, tag: str, checkpoint: Path | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out, self.tag, self.checkpoint = out, tag, checkpoint
        self.batches: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.batches.append(batch.clone())
        return self.weight.square().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self) -> None:
        torch.save(self.batches, self.out / f"{self.tag}_rank{self.global_rank}.pt")
        if self.checkpoint is not None:
            # Every rank must take part: the data module gathers the per-rank stream positions.
            self.trainer.save_checkpoint(self.checkpoint)


def _run(config: DataConfig, out: Path, tag: str, max_steps: int, **kwargs: object) -> list[list[torch.Tensor]]:
    checkpoint = kwargs.pop("save_to", None)
    corpora = kwargs.pop("corpora", None)
    trainer = quiet_cpu_trainer(devices=2, strategy="ddp_spawn", max_steps=max_steps, limit_val_batches=0)
    data = PretrainDataModule(config, batch_size=BATCH, corpora=corpora)
    trainer.fit(RankRecorder(out, tag, checkpoint), datamodule=data, **kwargs)
    return [torch.load(out / f"{tag}_rank{rank}.pt") for rank in range(2)]


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[str, Path]:
    documents = make_documents(count=16)
    pattern = write_documents(tmp_path / "corpus", documents)
    tokenizer_path, _ = make_tokenizer(tmp_path, documents)
    return pattern, tokenizer_path


def test_ranks_get_their_own_shard_and_lightning_does_not_reshard_it(tmp_path: Path, corpus) -> None:
    config = make_config(tmp_path, *corpus)
    per_rank = _run(config, tmp_path, "cache", max_steps=5)

    data = PretrainDataModule(config, batch_size=BATCH)
    data.prepare_data()
    data.setup("fit")
    blocks: PackedBlocks = data.train_dataloader().dataset
    for rank, batches in enumerate(per_rank):
        indices = list(ResumableDistributedSampler(blocks, num_replicas=2, rank=rank, seed=config.shuffle_seed))
        expected = torch.stack([blocks[index] for index in indices[: 5 * BATCH]])
        assert torch.equal(torch.cat(batches), expected)


def test_streaming_ranks_resume_their_own_positions(tmp_path: Path, corpus) -> None:
    config = make_config(tmp_path, *corpus, streaming=True, shuffle_buffer=0, streaming_val_docs=0)
    uninterrupted = _run(config, tmp_path, "full", max_steps=10)
    checkpoint = tmp_path / "stream.ckpt"
    first = _run(config, tmp_path, "first", max_steps=4, save_to=checkpoint)
    second = _run(config, tmp_path, "second", max_steps=10, ckpt_path=checkpoint)

    assert not torch.equal(uninterrupted[0][0], uninterrupted[1][0])
    for rank in range(2):
        resumed = first[rank] + second[rank]
        assert len(resumed) == 10
        assert all(torch.equal(batch, expected) for batch, expected in zip(resumed, uninterrupted[rank], strict=True))


def test_mixture_ranks_take_disjoint_examples_in_blend_order_and_resume_them(tmp_path: Path) -> None:
    shared, sources = make_mixture(tmp_path)
    uninterrupted = _run(shared, tmp_path, "full", max_steps=8, corpora=sources)
    checkpoint = tmp_path / "mixture.ckpt"
    first = _run(shared, tmp_path, "first", max_steps=3, corpora=sources, save_to=checkpoint)
    second = _run(shared, tmp_path, "second", max_steps=8, corpora=sources, ckpt_path=checkpoint)

    data = PretrainDataModule(shared, batch_size=BATCH, corpora=sources)
    data.prepare_data()
    data.setup("fit")
    blocks = data.train_dataloader().dataset
    plan_sources, examples, _ = data._schedule.plan(8 * BATCH * 2)
    global_blocks = [blocks[int(index)] for index in blocks.offsets[plan_sources] + examples]
    for rank in range(2):
        expected = torch.stack(global_blocks[rank::2])
        assert torch.equal(torch.cat(uninterrupted[rank]), expected)
        assert torch.equal(torch.cat(first[rank] + second[rank]), expected)
    rows = [{tuple(row.tolist()) for row in torch.cat(batches)} for batches in uninterrupted]
    assert rows[0].isdisjoint(rows[1])
