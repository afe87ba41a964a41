"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.optim import OptimConfig, build_optimizer, lr_multiplier, parameter_groups
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.transformer import Transformer


def _small_model(tie: bool = False) -> Transformer:
    config = TransformerConfig(vocab_size=64, hidden_dim=32, n_layers=1, dense_hidden_dim=64, tie_embeddings=tie)
    config.attention.qkv_bias = True
    return Transformer(config)


def test_norms_biases_and_embeddings_are_not_decayed_by_default() -> None:
    model = _small_model()
    decay, no_decay = parameter_groups(model, OptimConfig(weight_decay=0.1), {model.embed.weight})
    no_decay_ids = {id(p) for p in no_decay["params"]}
    decay_ids = {id(p) for p in decay["params"]}
    names = dict(model.named_parameters())
    assert id(names["embed.weight"]) in no_decay_ids
    assert id(names["blocks.0.attn.q_proj.bias"]) in no_decay_ids
    assert id(names["blocks.0.attn_norm.weight"]) in no_decay_ids
    assert id(names["blocks.0.ffn.experts.gate_proj"]) in decay_ids
    assert id(names["blocks.0.ffn.router.weight"]) in decay_ids
    assert id(names["lm_head.weight"]) in decay_ids
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay_ids) + len(no_decay_ids) == len(list(model.parameters()))


def test_decay_embeddings_moves_the_embedding_into_the_decay_group() -> None:
    model = _small_model(tie=True)
    decay, _ = parameter_groups(model, OptimConfig(decay_embeddings=True), {model.embed.weight})
    assert any(p is model.embed.weight for p in decay["params"])


def test_warmup_is_linear_and_cosine_ends_at_min_lr() -> None:
    config = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, config, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, config, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, config, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, config, 110) == pytest.approx(0.1)
    assert lr_multiplier(500, config, 110) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction() -> None:
    config = OptimConfig(warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(50, config, 100) == 1.0
    assert lr_multiplier(79, config, 100) == 1.0
    assert lr_multiplier(90, config, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, config, 100) == pytest.approx(0.0)


def test_scheduler_drives_the_optimizer_learning_rate() -> None:
    model = _small_model()
    config = OptimConfig(lr=1e-3, warmup_steps=4, schedule="constant")
    optimizer, scheduler = build_optimizer(model, config, {model.embed.weight}, total_steps=10)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert isinstance(optimizer, torch.optim.AdamW)


def test_too_few_steps_for_the_warmup_is_a_config_error() -> None:
    model = _small_model()
    with pytest.raises(ConfigError, match=r"trainer.max_steps=5 must exceed optim.warmup_steps=10"):
        build_optimizer(model, OptimConfig(warmup_steps=10), {model.embed.weight}, total_steps=5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", 0.0, "optim.lr=0.0"),
        ("min_lr_ratio", 1.5, "optim.min_lr_ratio=1.5"),
        ("decay_fraction", 0.0, "decay"),
        ("lr", float("nan"), "optim.lr=nan must be positive and finite"),
        ("lr", float("inf"), "optim.lr=inf must be positive and finite"),
        ("eps", 0.0, "optim.eps=0.0 must be positive"),
        ("eps", float("nan"), "optim.eps=nan"),
        ("weight_decay", float("nan"), "optim.weight_decay=nan must be >= 0 and finite"),
        ("weight_decay", -0.1, "optim.weight_decay=-0.1"),
    ],
)
def test_invalid_optim_values_name_the_field(field: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OptimConfig(**{field: value})
