"""Training FLOPs per token from the config equal what torch's FLOP counter sees in a real step."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.flops import training_flops_per_token
from sdmoe_train.models.parameters import count_parameters
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe import experts

BATCH, SEQ = 2, 32


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny tensors: a second intra-op thread only adds contention (up to 40x slower on a loaded 2-core machine)."""
    torch.set_num_threads(1)


def _tiny(name: str) -> TransformerConfig:
    config = presets.PRESETS["tiny_qwen_moe" if name == "dense" else name]()
    config.n_layers, config.vocab_size, config.max_seq_len = 2, 256, SEQ
    if name == "dense":
        config.moe = None
    return config


def _counted_training_step(config: TransformerConfig) -> int:
    """FLOPs of forward + backward of one (BATCH, SEQ) batch, as ``FlopCounterMode`` counts them."""
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    # The math backend runs attention as matmuls, which the counter sees on every platform (it has no
    # formula for the CPU flash kernel); it computes the full S x S scores like the formula's convention.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).logits.float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "name", ["dense", "tiny_qwen_moe", "tiny_deepseek_moe"], ids=["dense_gqa", "moe_gqa", "moe_mla"]
)
def test_formula_equals_the_flop_counter_when_experts_run_as_plain_matmuls(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The per-expert loop (plain matmuls) instead of grouped_mm, which the counter has no formula for.
    monkeypatch.setattr(experts, "_has_grouped_mm_kernel", lambda x, weight: False)
    config = _tiny(name)
    assert _counted_training_step(config) == training_flops_per_token(config, SEQ).total * BATCH * SEQ


@pytest.mark.parametrize("name", ["tiny_qwen_moe", "tiny_deepseek_moe"])
def test_the_flop_counter_misses_exactly_the_grouped_expert_gemms(name: str) -> None:
    config = _tiny(name)
    flops = training_flops_per_token(config, SEQ)
    missed = flops.total * BATCH * SEQ - _counted_training_step(config)
    assert missed == flops.routed_experts * BATCH * SEQ > 0


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_matmul_flops_are_six_per_active_matmul_weight_plus_attention(name: str) -> None:
    """Independent of the formula's structure: 6 FLOPs per token per active weight that multiplies."""
    config = presets.PRESETS[name]()
    counts = count_parameters(config)
    with torch.device("meta"):
        model = Transformer(config)
    not_multiplying = model.embed.weight.numel() + sum(
        param.numel() for param_name, param in model.named_parameters() if param.dim() == 1
    )  # the embedding is a lookup; 1-D parameters are norm weights and biases
    flops = training_flops_per_token(config, config.max_seq_len)
    assert flops.total - flops.attention_scores == 6 * (counts.active - not_multiplying)


def test_only_attention_scores_grow_with_the_sequence_length() -> None:
    config = presets.deepseek_moe_2b_a0_8b()
    short, long = training_flops_per_token(config, 1024), training_flops_per_token(config, 4096)
    assert long.attention_scores == 4 * short.attention_scores
    assert long.total - long.attention_scores == short.total - short.attention_scores
    mla = config.attention.mla
    per_layer_macs = 4096 * config.attention.num_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim)
    assert long.attention_scores == 6 * config.n_layers * per_layer_macs
