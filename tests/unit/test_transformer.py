"""Decoder behaviour: causality, shapes, RoPE, GQA and MLA against references, init scheme, MoE wiring."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.models.attention import GroupedQueryAttention, MultiHeadLatentAttention
from sdmoe_train.models.config import AttentionConfig, MLAConfig, MoEConfig, TransformerConfig
from sdmoe_train.models.rope import apply_rotary, rotary_tables
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe import layer as layer_module
from sdmoe_train.moe.layer import MoELayer
from sdmoe_train.moe.mlp import SwiGLU


def _num_moe_layers(config: TransformerConfig) -> int:
    return sum(config.is_moe_layer(i) for i in range(config.n_layers))


def _causal_softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Plain masked-softmax attention over (B, H, S, d) tensors with equal head counts."""
    seq_len = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v


# --- causality and shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("position", [1, 8, 15])
def test_changing_a_token_changes_only_its_own_and_later_logits(tiny_config: TransformerConfig, position: int) -> None:
    model = Transformer(tiny_config).eval()
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 16))
    edited = tokens.clone()
    edited[:, position] = (edited[:, position] + 1) % tiny_config.vocab_size

    with torch.no_grad():
        logits = model(tokens).logits
        edited_logits = model(edited).logits

    torch.testing.assert_close(edited_logits[:, :position], logits[:, :position], rtol=0, atol=1e-5)
    changed_by = (edited_logits[:, position] - logits[:, position]).abs().amax(dim=-1)
    assert (changed_by > 1e-3).all(), changed_by


def test_forward_returns_logits_of_shape_batch_seq_vocab(tiny_config: TransformerConfig) -> None:
    model = Transformer(tiny_config)
    out = model(torch.randint(0, tiny_config.vocab_size, (3, 11)))

    assert out.logits.shape == (3, 11, tiny_config.vocab_size)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()


def test_moe_aux_fields_have_one_row_per_moe_layer(tiny_config: TransformerConfig) -> None:
    model = Transformer(tiny_config)
    batch, seq_len = 3, 10
    out = model(torch.randint(0, tiny_config.vocab_size, (batch, seq_len)))
    moe = tiny_config.moe
    num_layers = _num_moe_layers(tiny_config)
    aux = out.moe

    assert aux.layer_indices == tuple(i for i, _ in model.moe_layers())
    assert aux.layer_indices == tuple(range(moe.first_k_dense, tiny_config.n_layers))
    assert aux.loss.shape == ()
    assert aux.loss.requires_grad
    for per_layer in (
        aux.load_balance_loss_L,
        aux.sequence_balance_loss_L,
        aux.z_loss_L,
        aux.dropped_fraction_L,
    ):
        assert per_layer.shape == (num_layers,)
    assert aux.tokens_per_expert_LE.shape == (num_layers, moe.num_experts)
    assert aux.tokens_per_expert_LE.dtype == torch.int64
    # Every token picks top_k distinct experts in every MoE layer.
    assert aux.tokens_per_expert_LE.sum(dim=1).tolist() == [batch * seq_len * moe.top_k] * num_layers


def test_moe_aux_loss_is_the_coefficient_weighted_sum_of_layer_losses(tiny_config: TransformerConfig) -> None:
    moe = tiny_config.moe
    aux = Transformer(tiny_config)(torch.randint(0, tiny_config.vocab_size, (2, 12))).moe

    expected = (
        moe.aux_loss_coef * aux.load_balance_loss_L
        + moe.seq_aux_loss_coef * aux.sequence_balance_loss_L
        + moe.z_loss_coef * aux.z_loss_L
    ).sum()
    torch.testing.assert_close(aux.loss.detach(), expected)
    assert aux.loss.item() > 0


@pytest.mark.parametrize("checkpointed", [False, True])
def test_inference_without_routing_stats_gives_bitwise_the_same_logits_and_computes_none(
    tiny_config: TransformerConfig, checkpointed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Transformer(tiny_config).train(checkpointed)
    model.activation_checkpointing = checkpointed
    tokens = torch.randint(0, tiny_config.vocab_size, (3, 20))
    computed = []
    real_loss = layer_module.load_balance_loss
    monkeypatch.setattr(layer_module, "load_balance_loss", lambda *args: computed.append(1) or real_loss(*args))
    with torch.enable_grad():
        full = model(tokens)
        hidden_BSD, record = model.hidden_states(tokens, routing_stats=False)
    assert len(computed) == _num_moe_layers(tiny_config)  # forward, which training and validation call
    assert full.moe is not None and full.moe.loss.requires_grad
    assert record is None
    assert torch.equal(model.lm_head(hidden_BSD), full.logits)
    model.eval()
    with torch.no_grad():
        model.decode(tokens, model.new_cache(3))
    assert len(computed) == _num_moe_layers(tiny_config)  # neither hidden_states nor decode computed any


def test_dense_model_returns_no_moe_aux_and_only_swiglu_layers() -> None:
    config = TransformerConfig(vocab_size=64, hidden_dim=32, n_layers=2, dense_hidden_dim=48, moe=None)
    model = Transformer(config)
    out = model(torch.randint(0, 64, (2, 8)))

    assert out.moe is None
    assert out.logits.shape == (2, 8, 64)
    assert all(isinstance(block.ffn, SwiGLU) for block in model.blocks)
    assert all(block.ffn.up_proj.weight.shape == (48, 32) for block in model.blocks)
    assert list(model.moe_layers()) == []


def test_first_k_dense_layers_are_swiglu_and_the_rest_moe() -> None:
    config = TransformerConfig(
        vocab_size=64,
        hidden_dim=32,
        n_layers=4,
        dense_hidden_dim=48,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=16, first_k_dense=2),
    )
    model = Transformer(config)

    assert [type(block.ffn) for block in model.blocks] == [SwiGLU, SwiGLU, MoELayer, MoELayer]
    assert model.blocks[0].ffn.up_proj.weight.shape == (48, 32)
    assert [i for i, _ in model.moe_layers()] == [2, 3]
    assert model(torch.randint(0, 64, (1, 5))).moe.layer_indices == (2, 3)


# --- RoPE ------------------------------------------------------------------------------------------


def test_rotary_preserves_the_norm_of_every_vector() -> None:
    cos, sin = rotary_tables(32, 16, 10000.0, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 16)

    rotated = apply_rotary(x, cos, sin)

    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(rotated[..., 1:, :], x[..., 1:, :], atol=1e-3)


def test_rotary_is_identity_at_position_zero_and_rotates_by_position_times_frequency() -> None:
    # With rotary_dim 2 the only frequency is theta^0 = 1: position m rotates (1, 0) by m radians.
    cos, sin = rotary_tables(5, 2, 10000.0, torch.device("cpu"))
    unit = torch.tensor([1.0, 0.0]).expand(5, 2)

    rotated = apply_rotary(unit, cos, sin)

    angles = torch.arange(5, dtype=torch.float32)
    torch.testing.assert_close(rotated, torch.stack((angles.cos(), angles.sin()), dim=-1))


@pytest.mark.parametrize(("m", "n", "shift"), [(0, 0, 7), (3, 10, 5), (20, 4, 30), (1, 2, 61)])
def test_rotary_dot_products_depend_only_on_relative_offset(m: int, n: int, shift: int) -> None:
    dim = 16
    cos, sin = rotary_tables(64, dim, 10000.0, torch.device("cpu"))
    q, k = torch.randn(8, dim), torch.randn(8, dim)

    def rotated_dot(q_pos: int, k_pos: int) -> Tensor:
        q_rot = apply_rotary(q, cos[q_pos], sin[q_pos])
        k_rot = apply_rotary(k, cos[k_pos], sin[k_pos])
        return (q_rot * k_rot).sum(dim=-1)

    torch.testing.assert_close(rotated_dot(m + shift, n + shift), rotated_dot(m, n), rtol=1e-4, atol=1e-4)
    # The offset itself must matter, otherwise the check above would be vacuous.
    assert not torch.allclose(rotated_dot(m, n + 1), rotated_dot(m, n), atol=1e-3)


# --- attention against explicit references ---------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_grouped_query_attention_equals_repeat_interleaved_kv_reference(num_kv_heads: int) -> None:
    num_heads, head_dim, batch, seq_len = 4, 8, 2, 9
    config = TransformerConfig(
        hidden_dim=32,
        attention=AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, qkv_bias=True),
        moe=None,
    )
    attn = GroupedQueryAttention(config)
    with torch.no_grad():
        for bias in (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias):
            bias.normal_()
    x = torch.randn(batch, seq_len, 32)
    cos, sin = rotary_tables(seq_len, head_dim, 10000.0, x.device)

    q = apply_rotary(attn.q_proj(x).view(batch, seq_len, num_heads, head_dim).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(batch, seq_len, num_kv_heads, head_dim).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(batch, seq_len, num_kv_heads, head_dim).transpose(1, 2)
    group = num_heads // num_kv_heads
    # Query head h reads key/value head h // group.
    out = _causal_softmax_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), 1 / math.sqrt(head_dim)
    )
    expected = attn.o_proj(out.transpose(1, 2).reshape(batch, seq_len, num_heads * head_dim))

    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_qk_norm_rms_normalises_each_query_and_key_head_before_rope() -> None:
    num_heads, num_kv_heads, head_dim, batch, seq_len = 4, 2, 8, 2, 7
    config = TransformerConfig(
        hidden_dim=32, norm_eps=1e-5, attention=AttentionConfig(num_heads=4, num_kv_heads=2, qk_norm=True), moe=None
    )
    attn = GroupedQueryAttention(config)
    with torch.no_grad():
        attn.q_norm.weight.normal_()
        attn.k_norm.weight.normal_()
    x = torch.randn(batch, seq_len, 32)
    cos, sin = rotary_tables(seq_len, head_dim, 10000.0, x.device)

    def head_rms_norm(y: Tensor, weight: Tensor) -> Tensor:
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    q = head_rms_norm(attn.q_proj(x).view(batch, seq_len, num_heads, head_dim), attn.q_norm.weight)
    k = head_rms_norm(attn.k_proj(x).view(batch, seq_len, num_kv_heads, head_dim), attn.k_norm.weight)
    q, k = apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(batch, seq_len, num_kv_heads, head_dim).transpose(1, 2)
    out = _causal_softmax_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), head_dim**-0.5)
    expected = attn.o_proj(out.transpose(1, 2).reshape(batch, seq_len, num_heads * head_dim))

    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)
    assert GroupedQueryAttention(TransformerConfig(hidden_dim=32, moe=None)).q_norm is None


def test_qk_norm_with_mla_is_refused() -> None:
    with pytest.raises(ConfigError, match="attention.qk_norm=true is implemented for GQA only"):
        AttentionConfig(qk_norm=True, mla=MLAConfig())


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_projection_widths_follow_mla_config(q_lora_rank: int | None) -> None:
    mla = MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10)
    config = TransformerConfig(hidden_dim=32, attention=AttentionConfig(num_heads=3, mla=mla), moe=None)
    attn = MultiHeadLatentAttention(config)
    qk_width = 3 * (12 + 6)

    if q_lora_rank is None:
        assert attn.q_proj.weight.shape == (qk_width, 32)
        assert not hasattr(attn, "q_a_proj") and not hasattr(attn, "q_b_proj")
    else:
        assert not hasattr(attn, "q_proj")
        assert attn.q_a_proj.weight.shape == (24, 32)
        assert attn.q_a_norm.weight.shape == (24,)
        assert attn.q_b_proj.weight.shape == (qk_width, 24)
    assert attn.kv_a_proj.weight.shape == (20 + 6, 32)
    assert attn.kv_a_norm.weight.shape == (20,)
    assert attn.kv_b_proj.weight.shape == (3 * (12 + 10), 20)
    assert attn.o_proj.weight.shape == (32, 3 * 10)
    assert attn.rotary_dim == 6
    cos, sin = rotary_tables(7, 6, 10000.0, torch.device("cpu"))
    assert attn(torch.randn(2, 7, 32), cos, sin).shape == (2, 7, 32)


def test_mla_equals_reference_with_one_rotary_key_shared_by_all_heads() -> None:
    heads, nope, rope, v_dim, kv_rank, batch, seq_len = 3, 12, 6, 10, 20, 2, 7
    mla = MLAConfig(
        q_lora_rank=24, kv_lora_rank=kv_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v_dim
    )
    config = TransformerConfig(hidden_dim=32, attention=AttentionConfig(num_heads=heads, mla=mla), moe=None)
    attn = MultiHeadLatentAttention(config)
    with torch.no_grad():
        attn.q_a_norm.weight.uniform_(0.5, 1.5)
        attn.kv_a_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(batch, seq_len, 32)
    cos, sin = rotary_tables(seq_len, rope, 10000.0, x.device)

    def rms_norm(t: Tensor, weight: Tensor) -> Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + config.norm_eps) * weight

    q = attn.q_b_proj(rms_norm(attn.q_a_proj(x), attn.q_a_norm.weight))
    q = q.view(batch, seq_len, heads, nope + rope).transpose(1, 2)
    compressed = attn.kv_a_proj(x)
    latent, k_rope = compressed[..., :kv_rank], compressed[..., kv_rank:]
    kv = attn.kv_b_proj(rms_norm(latent, attn.kv_a_norm.weight)).view(batch, seq_len, heads, nope + v_dim)
    kv = kv.transpose(1, 2)
    k_rope = apply_rotary(k_rope, cos, sin).unsqueeze(1).expand(batch, heads, seq_len, rope)
    q = torch.cat((q[..., :nope], apply_rotary(q[..., nope:], cos, sin)), dim=-1)
    k = torch.cat((kv[..., :nope], k_rope), dim=-1)
    out = _causal_softmax_attention(q, k, kv[..., nope:], 1 / math.sqrt(nope + rope))
    expected = attn.o_proj(out.transpose(1, 2).reshape(batch, seq_len, heads * v_dim))

    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


# --- initialisation --------------------------------------------------------------------------------


def _init_test_config(attention: AttentionConfig) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=256,
        hidden_dim=256,
        n_layers=3,
        dense_hidden_dim=256,
        init_std=0.03,
        attention=attention,
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            expert_hidden_dim=64,
            num_shared_experts=1,
            shared_expert_gate=True,
            first_k_dense=1,
        ),
    )


def _expected_residual_names(model: Transformer) -> set[str]:
    names = set()
    for i, block in enumerate(model.blocks):
        names.add(f"blocks.{i}.attn.o_proj.weight")
        if isinstance(block.ffn, MoELayer):
            names.add(f"blocks.{i}.ffn.experts.down_proj")
            names.add(f"blocks.{i}.ffn.shared_experts.down_proj.weight")
        else:
            names.add(f"blocks.{i}.ffn.down_proj.weight")
    return names


@pytest.mark.parametrize(
    "attention",
    [
        AttentionConfig(num_heads=4, num_kv_heads=2, qkv_bias=True),
        AttentionConfig(
            num_heads=4,
            mla=MLAConfig(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        ),
    ],
    ids=["gqa", "mla"],
)
def test_init_uses_init_std_with_scaled_residual_projections_unit_norms_and_zero_biases(
    attention: AttentionConfig,
) -> None:
    config = _init_test_config(attention)
    model = Transformer(config)
    params = dict(model.named_parameters())
    residual_names = _expected_residual_names(model)
    assert residual_names <= params.keys()
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)

    kinds = {"weight": 0, "residual": 0, "norm": 0, "bias": 0}
    for name, param in params.items():
        if name.endswith(".bias"):
            kinds["bias"] += 1
            assert (param == 0).all(), name
        elif "norm" in name:
            kinds["norm"] += 1
            assert (param == 1).all(), name
        else:
            kind = "residual" if name in residual_names else "weight"
            kinds[kind] += 1
            expected_std = residual_std if kind == "residual" else config.init_std
            # Five standard errors of the sample std, but never looser than the stated 5%.
            tolerance = max(0.05, 5 / math.sqrt(2 * param.numel()))
            assert param.std().item() == pytest.approx(expected_std, rel=tolerance), name
            assert abs(param.mean().item()) < 5 * expected_std / math.sqrt(param.numel()), name
    assert all(count > 0 for kind, count in kinds.items() if kind != "bias" or attention.mla is None), kinds
    for _, layer in model.moe_layers():
        assert (layer.router.selection_bias == 0).all()


def test_reset_parameters_zeroes_selection_bias_moved_by_updates() -> None:
    config = _init_test_config(AttentionConfig(num_heads=4))
    config.moe.bias_update_rate = 0.1
    model = Transformer(config)
    counts = torch.tensor([[9, 1, 1, 1], [1, 1, 1, 9]])
    model.update_routing_biases(counts)
    assert all((layer.router.selection_bias != 0).any() for _, layer in model.moe_layers())

    model.reset_parameters()

    assert all((layer.router.selection_bias == 0).all() for _, layer in model.moe_layers())


def test_tied_embeddings_share_one_tensor_and_untied_do_not() -> None:
    tied = Transformer(TransformerConfig(vocab_size=64, hidden_dim=32, tie_embeddings=True, moe=None))
    untied = Transformer(TransformerConfig(vocab_size=64, hidden_dim=32, tie_embeddings=False, moe=None))

    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.embed.weight)
    assert len(list(untied.parameters())) == len(list(tied.parameters())) + 1


# --- routing bias update ---------------------------------------------------------------------------


def test_update_routing_biases_moves_each_layer_bias_by_the_sign_of_its_load_error(
    tiny_config: TransformerConfig,
) -> None:
    model = Transformer(tiny_config)
    moe = tiny_config.moe
    num_layers = _num_moe_layers(tiny_config)
    counts = torch.randint(0, 50, (num_layers, moe.num_experts))
    counts[:, 0] = counts.float().mean(dim=1).round().long()  # some experts exactly at the mean load
    counts[0, 1] = 1000

    model.update_routing_biases(counts)
    model.update_routing_biases(counts)

    for row, (_, layer) in enumerate(model.moe_layers()):
        load = counts[row].float()
        expected = 2 * moe.bias_update_rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(layer.router.selection_bias, expected)
    if moe.bias_update_rate > 0:
        first_bias = next(model.moe_layers())[1].router.selection_bias
        assert first_bias[1] < 0  # the overloaded expert is pushed down


def test_update_routing_biases_rejects_a_row_count_other_than_the_moe_layers(
    tiny_config: TransformerConfig,
) -> None:
    config = dataclasses.replace(tiny_config, moe=dataclasses.replace(tiny_config.moe, bias_update_rate=0.01))
    model = Transformer(config)
    num_layers = _num_moe_layers(config)
    # Uneven loads, so that an update would move every layer's bias.
    counts = torch.arange(config.moe.num_experts).repeat(num_layers + 1, 1)

    with pytest.raises(ValueError, match=rf"{num_layers + 1} rows of expert counts for {num_layers} MoE layers"):
        model.update_routing_biases(counts)
    assert all(not layer.router.selection_bias.any() for _, layer in model.moe_layers()), "no bias may change"


# --- meta device -----------------------------------------------------------------------------------


def test_model_built_on_meta_device_allocates_nothing_and_materialises_with_reset(
    tiny_config: TransformerConfig,
) -> None:
    with torch.device("meta"):
        meta_model = Transformer(tiny_config)
    real_model = Transformer(tiny_config)

    assert all(p.is_meta for p in meta_model.parameters())
    assert all(b.is_meta for b in meta_model.buffers())
    meta_shapes = {name: p.shape for name, p in meta_model.named_parameters()}
    assert meta_shapes == {name: p.shape for name, p in real_model.named_parameters()}

    meta_model.to_empty(device="cpu")
    meta_model.reset_parameters()
    for _, layer in meta_model.moe_layers():
        assert (layer.router.selection_bias == 0).all()
    out = meta_model(torch.randint(0, tiny_config.vocab_size, (2, 8)))
    assert out.logits.shape == (2, 8, tiny_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.moe.loss)


def test_sdpa_without_gqa_flag_matches_manual_reference() -> None:
    # Guards the reference used above: the manual softmax agrees with SDPA on equal head counts.
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)
    torch.testing.assert_close(
        _causal_softmax_attention(q, k, v, 1 / math.sqrt(8)),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
        rtol=1e-5,
        atol=1e-5,
    )


def test_sequences_beyond_max_seq_len_raise_an_error_not_an_assert(tiny_config: TransformerConfig) -> None:
    model = Transformer(tiny_config)
    tokens = torch.zeros(1, tiny_config.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"sequence of {tiny_config.max_seq_len + 1} tokens > max_seq_len"):
        model(tokens)
