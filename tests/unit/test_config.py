"""Config validation: every bad setting fails at construction with a ConfigError naming field and value."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.models import presets
from sdmoe_train.models.config import AttentionConfig, MLAConfig, MoEConfig, TransformerConfig

INVALID_CONFIGS: dict[str, tuple[Callable[[], object], str]] = {
    "top_k_above_num_experts": (
        lambda: MoEConfig(num_experts=8, top_k=9),
        r"moe\.top_k=9 must lie in \[1, moe\.num_experts=8\]",
    ),
    "top_k_zero": (lambda: MoEConfig(num_experts=8, top_k=0), r"moe\.top_k=0 must lie in \[1,"),
    "n_group_not_dividing_num_experts": (
        lambda: MoEConfig(num_experts=8, top_k=2, n_group=3),
        r"moe\.n_group=3 must divide moe\.num_experts=8",
    ),
    "topk_group_above_n_group": (
        lambda: MoEConfig(num_experts=8, top_k=2, n_group=2, topk_group=3),
        r"moe\.topk_group=3 must lie in \[1, moe\.n_group=2\]",
    ),
    "topk_group_zero": (
        lambda: MoEConfig(num_experts=8, top_k=2, n_group=2, topk_group=0),
        r"moe\.topk_group=0",
    ),
    "top_k_beyond_experts_in_topk_group_groups": (
        lambda: MoEConfig(num_experts=16, top_k=5, n_group=4, topk_group=1),
        r"moe\.top_k=5 exceeds the 4 experts inside moe\.topk_group=1",
    ),
    "top2_sum_with_single_expert_groups": (
        lambda: MoEConfig(num_experts=4, top_k=2, n_group=4, topk_group=2, group_score_fn="top2_sum"),
        r"moe\.group_score_fn=top2_sum",
    ),
    "num_kv_heads_not_dividing_num_heads": (
        lambda: AttentionConfig(num_heads=8, num_kv_heads=3),
        r"attention\.num_kv_heads=3 must divide attention\.num_heads=8",
    ),
    "odd_explicit_head_dim": (
        lambda: AttentionConfig(num_heads=4, head_dim=63),
        r"attention\.head_dim=63 must be even",
    ),
    "odd_derived_head_dim": (
        lambda: TransformerConfig(hidden_dim=36, attention=AttentionConfig(num_heads=4, num_kv_heads=4)),
        r"head width 9 .*must be even",
    ),
    "hidden_dim_not_divisible_by_num_heads": (
        lambda: TransformerConfig(hidden_dim=30, attention=AttentionConfig(num_heads=4, num_kv_heads=4)),
        r"arch\.hidden_dim=30 must be divisible by attention\.num_heads=4",
    ),
    "odd_mla_rope_head_dim": (
        lambda: MLAConfig(qk_rope_head_dim=15),
        r"attention\.mla\.qk_rope_head_dim=15 must be even",
    ),
    "zero_mla_q_lora_rank": (
        lambda: MLAConfig(q_lora_rank=0),
        r"attention\.mla\.q_lora_rank=0 must be positive",
    ),
    "first_k_dense_above_n_layers": (
        lambda: TransformerConfig(n_layers=4, moe=MoEConfig(first_k_dense=5)),
        r"moe\.first_k_dense=5 exceeds arch\.n_layers=4",
    ),
    "negative_first_k_dense": (lambda: MoEConfig(first_k_dense=-1), r"moe\.first_k_dense=-1 must be >= 0"),
    "negative_aux_loss_coef": (
        lambda: MoEConfig(aux_loss_coef=-0.01),
        r"moe\.aux_loss_coef=-0\.01 must be >= 0",
    ),
    "negative_seq_aux_loss_coef": (
        lambda: MoEConfig(seq_aux_loss_coef=-1e-4),
        r"moe\.seq_aux_loss_coef=-0\.0001 must be >= 0",
    ),
    "negative_z_loss_coef": (lambda: MoEConfig(z_loss_coef=-0.5), r"moe\.z_loss_coef=-0\.5 must be >= 0"),
    "negative_bias_update_rate": (
        lambda: MoEConfig(bias_update_rate=-0.001),
        r"moe\.bias_update_rate=-0\.001 must be >= 0",
    ),
    "negative_num_shared_experts": (
        lambda: MoEConfig(num_shared_experts=-1),
        r"moe\.num_shared_experts=-1 must be >= 0",
    ),
    "shared_expert_gate_without_shared_experts": (
        lambda: MoEConfig(num_shared_experts=0, shared_expert_gate=True),
        r"moe\.shared_expert_gate=true needs moe\.num_shared_experts >= 1",
    ),
    "zero_capacity_factor": (
        lambda: MoEConfig(capacity_factor=0.0),
        r"moe\.capacity_factor=0\.0 must be positive",
    ),
    "negative_capacity_factor": (
        lambda: MoEConfig(capacity_factor=-1.25),
        r"moe\.capacity_factor=-1\.25 must be positive",
    ),
    "zero_routed_scaling_factor": (
        lambda: MoEConfig(routed_scaling_factor=0.0),
        r"moe\.routed_scaling_factor=0\.0 must be positive",
    ),
    "zero_vocab_size": (lambda: TransformerConfig(vocab_size=0), r"arch\.vocab_size=0 must be positive"),
    "negative_init_std": (
        lambda: TransformerConfig(init_std=-0.02),
        r"arch\.init_std=-0\.02 must be positive",
    ),
    # NaN compares false with everything, so `value <= 0` alone would let it through.
    "nan_init_std": (
        lambda: TransformerConfig(init_std=float("nan")),
        r"arch\.init_std=nan must be positive and finite",
    ),
    "infinite_norm_eps": (lambda: TransformerConfig(norm_eps=float("inf")), r"arch\.norm_eps=inf must be positive and"),
    "nan_rope_theta": (
        lambda: AttentionConfig(rope_theta=float("nan")),
        r"attention\.rope_theta=nan must be positive and finite",
    ),
    "nan_capacity_factor": (
        lambda: MoEConfig(capacity_factor=float("nan")),
        r"moe\.capacity_factor=nan must be positive and finite",
    ),
    "infinite_routed_scaling_factor": (
        lambda: MoEConfig(routed_scaling_factor=float("inf")),
        r"moe\.routed_scaling_factor=inf must be positive and finite",
    ),
    "nan_aux_loss_coef": (lambda: MoEConfig(aux_loss_coef=float("nan")), r"moe\.aux_loss_coef=nan must be >= 0"),
    "infinite_seq_aux_loss_coef": (
        lambda: MoEConfig(seq_aux_loss_coef=float("inf")),
        r"moe\.seq_aux_loss_coef=inf must be >= 0 and finite",
    ),
    "nan_bias_update_rate": (lambda: MoEConfig(bias_update_rate=float("nan")), r"moe\.bias_update_rate=nan must be"),
}


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(("build", "message"), INVALID_CONFIGS.values(), ids=INVALID_CONFIGS.keys())
def test_invalid_setting_raises_config_error_naming_field_and_value(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_invalid_nested_moe_config_fails_while_building_the_transformer_config() -> None:
    with pytest.raises(ConfigError, match=re.escape("moe.top_k=3 must lie in [1, moe.num_experts=2]")):
        TransformerConfig(moe=MoEConfig(num_experts=2, top_k=3))


@pytest.mark.parametrize(
    "build",
    [
        lambda: MoEConfig(num_experts=8, top_k=8),
        lambda: MoEConfig(num_experts=16, top_k=4, n_group=4, topk_group=1),
        lambda: MoEConfig(num_experts=16, top_k=8, n_group=4, topk_group=2),
        lambda: MoEConfig(num_experts=4, top_k=1, n_group=4, topk_group=1, group_score_fn="max"),
        lambda: MoEConfig(capacity_factor=0.01, aux_loss_coef=0.0, bias_update_rate=0.0),
        lambda: TransformerConfig(n_layers=3, moe=MoEConfig(first_k_dense=3)),
        lambda: TransformerConfig(hidden_dim=30, attention=AttentionConfig(num_heads=4, head_dim=8)),
        lambda: TransformerConfig(moe=None),
    ],
    ids=[
        "top_k_equal_num_experts",
        "top_k_equal_experts_in_one_group",
        "top_k_equal_experts_in_two_groups",
        "max_group_score_with_single_expert_groups",
        "small_capacity_zero_coefficients",
        "first_k_dense_equal_n_layers",
        "explicit_head_dim_frees_hidden_dim",
        "dense_model",
    ],
)
def test_boundary_settings_are_accepted(build: Callable[[], object]) -> None:
    build()


def test_mla_ignores_num_kv_heads() -> None:
    config = AttentionConfig(num_heads=8, num_kv_heads=3, mla=MLAConfig())
    assert config.mla is not None


def test_divisor_hint_lists_the_valid_group_counts() -> None:
    with pytest.raises(ConfigError) as info:
        MoEConfig(num_experts=12, top_k=2, n_group=5)
    for divisor in ("1", "2", "3", "4", "6", "12"):
        assert re.search(rf"\b{divisor}\b", str(info.value).split("valid:")[1]), str(info.value)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_constructs_a_valid_config(name: str) -> None:
    config = presets.PRESETS[name]()
    assert isinstance(config, TransformerConfig)
    assert config.moe is not None


def test_a_checkpoint_naming_moe_config_by_its_former_module_still_loads_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sdmoe_train.lightning.module  # noqa: F401  (registers the configs for weights-only loading)

    config = MoEConfig(num_experts=4, top_k=1)
    # Checkpoints written before MoEConfig moved to sdmoe_train.moe.config name it by its old module.
    monkeypatch.setattr(MoEConfig, "__module__", "sdmoe_train.models.config")
    torch.save({"hyper_parameters": {"moe": config}}, tmp_path / "old.ckpt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "old.ckpt", weights_only=True)["hyper_parameters"]["moe"] == config
