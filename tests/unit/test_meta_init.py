"""Meta-device construction + materialise gives exactly the weights of eager construction on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.meta_init import capture_rng_state, materialise, on_meta_device
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import SDMoEConfig, apply_spectral_decoupling
from sdmoe_train.moe.ssmoe_router import SSMoEConfig, apply_spectral_routing
from sdmoe_train.parallel.expert_parallel import apply_expert_parallel
from sdmoe_train.parallel.groups import ExpertParallelGroups

SEED = 1234


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny tensors: a second intra-op thread only adds contention (up to 40x slower on a loaded 2-core machine)."""
    torch.set_num_threads(1)


def _eager(config: TransformerConfig, sdmoe: SDMoEConfig, ssmoe: SSMoEConfig | None = None) -> Transformer:
    """What PretrainModule built before meta-device init: everything on the CPU from the seeded global RNG."""
    torch.manual_seed(SEED)
    model = Transformer(config)
    apply_spectral_decoupling(model, sdmoe)
    apply_spectral_routing(model, ssmoe or SSMoEConfig())
    return model


def _lazy(config: TransformerConfig, sdmoe: SDMoEConfig) -> tuple[Transformer, torch.Tensor]:
    torch.manual_seed(SEED)
    state = capture_rng_state()
    with torch.device("meta"):
        model = Transformer(config)
        apply_spectral_decoupling(model, sdmoe)
    return model, state


def _assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("sdmoe", [False, True], ids=["vanilla", "sdmoe"])
def test_materialised_model_has_the_eager_weights_bit_for_bit(tiny_config: TransformerConfig, sdmoe: bool) -> None:
    sdmoe_config = SDMoEConfig(enabled=sdmoe, rank=4)
    expected = _eager(tiny_config, sdmoe_config).state_dict()
    model, state = _lazy(tiny_config, sdmoe_config)
    assert on_meta_device(model)
    assert torch.equal(torch.get_rng_state(), state), "building on the meta device drew random numbers"

    materialise(model, "cpu", state)

    assert not on_meta_device(model)
    assert torch.equal(torch.get_rng_state(), state), "materialise touched the global generator"
    _assert_states_equal(model.state_dict(), expected)


def test_materialise_draws_on_the_cpu_whatever_the_default_device(tiny_config: TransformerConfig) -> None:
    """Lightning runs configure_model with the accelerator as the default device; the meta device stands in."""
    sdmoe_config = SDMoEConfig(enabled=True, rank=4)
    expected = _eager(tiny_config, sdmoe_config).state_dict()
    model, state = _lazy(tiny_config, sdmoe_config)
    with torch.device("meta"):
        materialise(model, "cpu", state)
    _assert_states_equal(model.state_dict(), expected)


def test_materialise_keeps_tied_embeddings_tied_and_equal_to_eager(tiny_config: TransformerConfig) -> None:
    tiny_config.tie_embeddings = True
    expected = _eager(tiny_config, SDMoEConfig()).state_dict()
    model, state = _lazy(tiny_config, SDMoEConfig())
    materialise(model, "cpu", state)
    assert model.lm_head.weight is model.embed.weight
    _assert_states_equal(model.state_dict(), expected)


@pytest.mark.parametrize("sdmoe", [False, True], ids=["vanilla", "sdmoe"])
@pytest.mark.parametrize("ep_rank", [0, 1])
def test_expert_parallel_rank_materialises_only_its_slice_of_the_eager_experts(
    tiny_config: TransformerConfig, sdmoe: bool, ep_rank: int
) -> None:
    sdmoe_config = SDMoEConfig(enabled=sdmoe, rank=4)
    expected = _eager(tiny_config, sdmoe_config).state_dict()
    model, state = _lazy(tiny_config, sdmoe_config)
    groups = ExpertParallelGroups(ep_size=2, ep_rank=ep_rank, world_size=2, ep_group=None, expert_dp_group=None)
    apply_expert_parallel(model, groups)  # on the meta device: the shards are cut before any storage exists

    materialise(model, "cpu", state)

    sharded = {name for name, param in model.named_parameters() if getattr(param, "allreduce", True) is False}
    assert sharded and all(name.endswith(("_proj", "_proj_unique")) for name in sharded)
    for name, tensor in model.state_dict().items():
        full = expected[name]
        if name in sharded:
            half = full.shape[0] // 2
            full = full[ep_rank * half : (ep_rank + 1) * half]
        assert torch.equal(tensor, full), name


def test_pretrain_module_builds_on_meta_and_configure_model_gives_the_eager_weights_with_ssmoe(
    tiny_config: TransformerConfig,
) -> None:
    sdmoe, ssmoe = SDMoEConfig(enabled=True, rank=4), SSMoEConfig(enabled=True, k=4, variant="unique")
    expected = _eager(tiny_config, sdmoe, ssmoe).state_dict()
    torch.manual_seed(SEED)
    module = PretrainModule(tiny_config, sdmoe=sdmoe, ssmoe=ssmoe)
    assert on_meta_device(module.model)

    module.configure_model()
    module.configure_model()  # idempotent: Lightning calls it again for fit after validate

    assert any(name.endswith("router.spectral_rows") for name in expected)
    _assert_states_equal(module.model.state_dict(), expected)


def test_building_the_module_draws_nothing_from_the_global_generator(
    tiny_config: TransformerConfig,
) -> None:
    """Building the module draws nothing from the global generator any more (it used to draw every weight)."""
    torch.manual_seed(SEED)
    PretrainModule(tiny_config)
    after_module = torch.rand(3)
    torch.manual_seed(SEED)
    assert torch.equal(after_module, torch.rand(3))


PRESET_SIZES = """
import json, resource, sys
import torch
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models import presets
from sdmoe_train.models.meta_init import on_meta_device
from sdmoe_train.models.parameters import count_model_parameters
from sdmoe_train.moe.sdmoe import SDMoEConfig
result = {"baseline_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
for name in sys.argv[1:]:
    for sdmoe in (False, True):
        module = PretrainModule(presets.PRESETS[name](), sdmoe=SDMoEConfig(enabled=sdmoe, rank=8))
        counts = count_model_parameters(module.model)
        result[f"{name}{'+sdmoe' if sdmoe else ''}"] = {
            "meta": on_meta_device(module.model),
            "total": counts.total,
            "active": counts.active,
            "total_non_embedding": counts.total_non_embedding,
            "active_non_embedding": counts.active_non_embedding,
            "fp32_bytes": sum(p.numel() * 4 for p in module.parameters()),
        }
result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(result))
"""


def test_paper_scale_presets_construct_on_the_meta_device_within_a_small_host_memory() -> None:
    """7B-A1.5B (28.5 GB in fp32) and DeepSeek 2B-A0.8B, with and without SD-MoE, in a fresh process."""
    repo = Path(__file__).parents[2]
    names = ["qwen_moe_7b_a1_5b", "deepseek_moe_2b_a0_8b"]
    command = [sys.executable, "-c", PRESET_SIZES, *names]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])

    # The documented counts (README, models/presets.py), in billions to three decimals.
    documented = {"qwen_moe_7b_a1_5b": (6.671, 1.386), "deepseek_moe_2b_a0_8b": (1.917, 0.709)}
    for name, (total, active) in documented.items():
        sizes = result[name]
        assert sizes["meta"] and result[f"{name}+sdmoe"]["meta"]
        assert round(sizes["total_non_embedding"] / 1e9, 3) == total
        assert round(sizes["active_non_embedding"] / 1e9, 3) == active
    assert round(result["qwen_moe_7b_a1_5b"]["total"] / 1e9, 2) == 7.14
    assert round(result["qwen_moe_7b_a1_5b"]["active"] / 1e9, 2) == 1.85
    # SD-MoE adds one common matrix per decomposed type and MoE layer: 40 layers x 3 x 1536 x 1024 (7B).
    assert result["qwen_moe_7b_a1_5b+sdmoe"]["total"] - result["qwen_moe_7b_a1_5b"]["total"] == 40 * 3 * 1536 * 1024
    fp32_gib = result["qwen_moe_7b_a1_5b"]["fp32_bytes"] / 2**30
    grown_gib = (result["peak_rss_kib"] - result["baseline_rss_kib"]) / 2**20
    peak_gib = result["peak_rss_kib"] / 2**20
    assert fp32_gib > 26
    assert grown_gib < 0.25 and peak_gib < 2.0, (grown_gib, peak_gib)
