"""Expert sharding and the parallel layout without processes: slices, marks, state conversion, config errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import SDMoEConfig, apply_spectral_decoupling
from sdmoe_train.parallel.all_to_all import AllToAllDispatcher
from sdmoe_train.parallel.config import ParallelConfig
from sdmoe_train.parallel.expert_parallel import (
    apply_expert_parallel,
    expert_sharded_names,
    is_expert_parameter,
    merge_expert_shards,
    shard_expert_state,
    split_expert_param_groups,
)
from sdmoe_train.parallel.groups import ExpertParallelGroups
from sdmoe_train.parallel.lightning import enable_expert_parallel


def _groups(ep_rank: int, ep_size: int = 2) -> ExpertParallelGroups:
    # No process group is needed to shard; only the all-to-all would use one.
    return ExpertParallelGroups(
        ep_size=ep_size, ep_rank=ep_rank, world_size=ep_size, ep_group=None, expert_dp_group=None
    )


def _planted_model(config: TransformerConfig, sdmoe: bool) -> Transformer:
    config.moe.expert_hidden_dim = 16  # SD-MoE's exact spectral init costs an SVD per expert and matrix
    torch.manual_seed(0)
    model = Transformer(config)
    if sdmoe:
        apply_spectral_decoupling(model, SDMoEConfig(enabled=True, rank=2, matrices=["up", "down"]))
    with torch.no_grad():
        for layer, moe in model.moe_layers():
            for matrix, (_, bank) in enumerate(moe.experts.named_parameters(recurse=False)):
                if bank.dim() == 3:
                    for expert in range(bank.shape[0]):
                        bank[expert].fill_(1000 * layer + 10 * matrix + expert)
    return model


@pytest.mark.parametrize("sdmoe", [False, True], ids=["vanilla", "sdmoe"])
def test_each_rank_keeps_exactly_its_experts_and_replicates_everything_else(
    tiny_config: TransformerConfig, sdmoe: bool
) -> None:
    full = _planted_model(tiny_config, sdmoe).state_dict()
    num_experts = tiny_config.moe.num_experts
    for ep_rank in range(2):
        model = _planted_model(tiny_config, sdmoe)
        apply_expert_parallel(model, _groups(ep_rank))
        sharded = set(expert_sharded_names(model))
        assert sharded and all(".experts." in name for name in sharded)
        assert not any(name.endswith(("_common", "router.weight")) for name in sharded)
        local = model.state_dict()
        assert local.keys() == full.keys()
        assert shard_expert_state(full, sharded, ep_rank, 2).keys() == local.keys()
        for name, tensor in shard_expert_state(full, sharded, ep_rank, 2).items():
            assert torch.equal(local[name], tensor), name
        for _, layer in model.moe_layers():
            assert isinstance(layer.dispatcher, AllToAllDispatcher)
            assert layer.experts.num_experts == num_experts // 2
            for param in layer.experts.parameters(recurse=False):
                assert is_expert_parameter(param) == (param.dim() == 3)
                if param.dim() == 3:
                    first = param[0].flatten()[0].item() % 10
                    assert first == ep_rank * num_experts // 2, "rank holds someone else's experts"


def test_expert_shards_merge_back_to_the_global_state(tiny_config: TransformerConfig) -> None:
    full = _planted_model(tiny_config, sdmoe=True).state_dict()
    sharded = [name for name, tensor in full.items() if name.endswith(("_proj", "_unique")) and tensor.dim() == 3]
    for ep_size in (2, 4):
        shards = [shard_expert_state(full, sharded, rank, ep_size) for rank in range(ep_size)]
        merged = merge_expert_shards(shards, sharded)
        assert merged.keys() == full.keys()
        assert all(torch.equal(merged[name], full[name]) for name in full)


def test_expert_parameters_get_their_own_deepspeed_marked_optimizer_groups(tiny_config: TransformerConfig) -> None:
    model = Transformer(tiny_config)
    apply_expert_parallel(model, _groups(0))
    params = list(model.parameters())
    groups = split_expert_param_groups([{"params": params, "weight_decay": 0.1}], "ep_size_2")
    assert [group.get("moe", False) for group in groups] == [False, True]
    assert groups[1]["name"] == "ep_size_2" and groups[1]["weight_decay"] == 0.1
    assert all(is_expert_parameter(p) for p in groups[1]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(params)


def test_ep_size_must_split_the_experts_and_the_processes(tiny_config: TransformerConfig) -> None:
    with pytest.raises(ConfigError, match=r"parallel.ep_size=0 must be >= 1"):
        ParallelConfig(ep_size=0)
    with pytest.raises(ConfigError, match=r"ep_size=3 must divide moe.num_experts=\d+ \(valid: 1, 2"):
        PretrainModule(tiny_config, parallel=ParallelConfig(ep_size=3))
    with pytest.raises(ConfigError, match=r"ep_size=4 must divide the world size 6 .*valid: 1, 2, 3, 6"):
        ParallelConfig(ep_size=4).check_world_size(6)


def test_expert_parallel_refuses_a_strategy_that_averages_all_gradients(tiny_config: TransformerConfig) -> None:
    trainer = SimpleNamespace(world_size=2, strategy=object())
    with pytest.raises(ConfigError, match="needs trainer.strategy=sdmoe_train.parallel.deepspeed.MoEDeepSpeedStrategy"):
        enable_expert_parallel(Transformer(tiny_config), ParallelConfig(ep_size=2), trainer)


def test_activation_checkpointing_recomputes_blocks_without_changing_loss_or_gradients(
    tiny_config: TransformerConfig,
) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 16))
    results = []
    for checkpointed in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointed
        out = model(tokens)
        (out.logits.square().mean() + out.moe.loss).backward()
        results.append({name: param.grad.clone() for name, param in model.named_parameters()})
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, msg=name)
