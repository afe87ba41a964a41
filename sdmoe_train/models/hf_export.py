"""Key and name mapping between our :class:`Transformer` and Hugging Face transformers checkpoints.

Three target architectures (transformers >= 5, checked against 5.23):

- ``qwen2_moe`` (``Qwen2MoeForCausalLM``): GQA with optional qkv bias, softmax top-k, one fused shared
  expert scaled by ``sigmoid(shared_expert_gate(x))``; dense layers via ``mlp_only_layers``.
- ``qwen3_moe`` (``Qwen3MoeForCausalLM``): GQA with per-head q/k RMSNorm, softmax top-k, no shared expert.
- ``deepseek_v3`` (``DeepseekV3ForCausalLM``): MLA, sigmoid scores with ``e_score_correction_bias``,
  group-limited top-k with top-2-sum group scores, ``routed_scaling_factor``, ``n_shared_experts`` shared
  experts, ``first_k_dense_replace`` dense layers.

Checkpoint names of other projects are spelled here and, for the import direction, in
:mod:`sdmoe_train.models.hf_import` (split off for size). The mapping is exact or refused: :func:`hf_config`
raises a :class:`ConfigError` listing every setting the target cannot express. Routed experts are written
in the per-expert layout of released checkpoints (``mlp.experts.{e}.gate_proj.weight``), which
transformers 5 fuses into ``gate_up_proj`` while loading and splits again in ``save_pretrained``; the
fused layout is accepted on import too.
"""

# Shape key: E experts, F expert width, D model width, H heads.

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.models.config import TransformerConfig

HFArchitecture = Literal["qwen2_moe", "qwen3_moe", "deepseek_v3"]
HF_ARCHITECTURES: tuple[HFArchitecture, ...] = ("qwen2_moe", "qwen3_moe", "deepseek_v3")
HF_MODEL_CLASSES: dict[HFArchitecture, str] = {
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
# DeepseekV3Attention builds q_a_layernorm and kv_a_layernorm without passing rms_norm_eps, so they always
# use the RMSNorm default; ours use arch.norm_eps.
DEEPSEEK_LATENT_NORM_EPS = 1e-6


def _choice_mismatches(arch: HFArchitecture, config: TransformerConfig) -> list[str]:
    """Every setting of ``config`` that ``arch`` cannot express exactly (empty when export is exact)."""
    attn, moe = config.attention, config.moe
    problems: list[str] = []
    if moe is None:
        return ["arch.moe=null (dense model): all three targets are MoE architectures"]
    if moe.capacity_factor is not None:
        problems.append(
            f"moe.capacity_factor={moe.capacity_factor}: transformers routes dropless (set capacity_factor: null)"
        )
    if attn.qk_norm and arch != "qwen3_moe":
        problems.append(f"attention.qk_norm=true: {arch} has no per-head q/k norm (qwen3_moe has)")
    if arch in ("qwen2_moe", "qwen3_moe"):
        if attn.mla is not None:
            problems.append(f"attention.mla is set: {arch} has grouped-query attention only")
        if moe.score_fn != "softmax":
            problems.append(f"moe.score_fn={moe.score_fn}: {arch} routes by softmax")
        if moe.n_group != 1:
            problems.append(f"moe.n_group={moe.n_group}: {arch} has no group-limited routing (needs 1)")
        if moe.routed_scaling_factor != 1.0:
            problems.append(f"moe.routed_scaling_factor={moe.routed_scaling_factor}: {arch} has none (needs 1.0)")
    if arch == "qwen2_moe":
        if moe.num_shared_experts == 0:
            problems.append("moe.num_shared_experts=0: qwen2_moe always has a shared expert (use qwen3_moe)")
        elif not moe.shared_expert_gate:
            problems.append("moe.shared_expert_gate=false: qwen2_moe always gates the shared expert")
    if arch == "qwen3_moe":
        if moe.num_shared_experts != 0:
            problems.append(f"moe.num_shared_experts={moe.num_shared_experts}: qwen3_moe has no shared expert")
        if attn.mla is None and not attn.qk_norm:
            problems.append("attention.qk_norm=false: qwen3_moe always normalises q and k per head")
        if attn.qkv_bias:
            problems.append("attention.qkv_bias=true: qwen3_moe's attention_bias would also bias o_proj")
    if arch == "deepseek_v3":
        if attn.mla is None:
            problems.append("attention.mla=null: deepseek_v3 uses Multi-head Latent Attention")
        if moe.score_fn != "sigmoid":
            problems.append(f"moe.score_fn={moe.score_fn}: deepseek_v3 routes by sigmoid scores")
        if moe.n_group > 1 and moe.group_score_fn != "top2_sum":
            problems.append(f"moe.group_score_fn={moe.group_score_fn}: deepseek_v3 scores groups by top-2 sum")
        if moe.num_experts // moe.n_group < 2:
            problems.append(f"moe.num_experts={moe.num_experts}: deepseek_v3 needs >= 2 experts per group")
        if moe.num_shared_experts == 0:
            problems.append("moe.num_shared_experts=0: deepseek_v3 always has shared experts")
        if moe.shared_expert_hidden_dim not in (None, moe.expert_hidden_dim):
            problems.append(
                f"moe.shared_expert_hidden_dim={moe.shared_expert_hidden_dim}: deepseek_v3 shared experts have "
                f"the routed width moe.expert_hidden_dim={moe.expert_hidden_dim}"
            )
        if moe.shared_expert_gate:
            problems.append("moe.shared_expert_gate=true: deepseek_v3 does not gate its shared experts")
        if config.norm_eps != DEEPSEEK_LATENT_NORM_EPS:
            problems.append(
                f"arch.norm_eps={config.norm_eps}: deepseek_v3 fixes the q/kv latent norms at eps "
                f"{DEEPSEEK_LATENT_NORM_EPS}"
            )
    return problems


def check_exportable(config: TransformerConfig, arch: HFArchitecture) -> None:
    """Raise a :class:`ConfigError` listing every setting ``arch`` cannot express exactly."""
    problems = _choice_mismatches(arch, config)
    if problems:
        raise ConfigError(
            f"cannot export exactly as {arch} ({HF_MODEL_CLASSES[arch]}); differing settings:\n  - "
            + "\n  - ".join(problems)
        )


def detect_architecture(config: TransformerConfig) -> HFArchitecture:
    """The target whose architecture matches ``config``; ConfigError listing each target's mismatches otherwise."""
    reports = {arch: _choice_mismatches(arch, config) for arch in HF_ARCHITECTURES}
    for arch, problems in reports.items():
        if not problems:
            return arch
    lines = [f"{arch}: " + "; ".join(problems) for arch, problems in reports.items()]
    raise ConfigError("arch matches no Hugging Face architecture exactly:\n  - " + "\n  - ".join(lines))


def hf_config(config: TransformerConfig, arch: HFArchitecture, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` contents of ``config`` exported as ``arch`` (checked with :func:`check_exportable`)."""
    check_exportable(config, arch)
    attn, moe = config.attention, config.moe
    assert moe is not None
    common: dict[str, Any] = {
        "architectures": [HF_MODEL_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": attn.num_heads,
        "intermediate_size": config.dense_hidden_dim,
        "moe_intermediate_size": moe.expert_hidden_dim,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": attn.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "deepseek_v3":
        mla = attn.mla
        assert mla is not None
        return common | {
            "num_key_value_heads": attn.num_heads,
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": moe.num_shared_experts,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "n_group": moe.n_group,
            "topk_group": moe.topk_group,
            "first_k_dense_replace": moe.first_k_dense,
            "q_lora_rank": mla.q_lora_rank,
            "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim,
            "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim,
            # Released DeepSeek weights keep the rotary rows interleaved; export permutes ours to match.
            "rope_interleave": True,
            "attention_bias": False,
            "num_nextn_predict_layers": 0,
        }
    qwen = common | {
        "num_key_value_heads": attn.num_kv_heads,
        "head_dim": config.head_dim,
        "num_experts": moe.num_experts,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(moe.first_k_dense)),
        "router_aux_loss_coef": moe.aux_loss_coef,
        "use_sliding_window": False,
    }
    if arch == "qwen2_moe":
        return qwen | {"qkv_bias": attn.qkv_bias, "shared_expert_intermediate_size": moe.shared_hidden_dim}
    return qwen | {"attention_bias": False}


def _rope_row_order(head_width: int, rope_dim: int, to_interleaved: bool) -> Tensor:
    """Row order of one head whose last ``rope_dim`` rows carry RoPE.

    HF's interleaved RoPE rotates pairs (2i, 2i+1) and emits them as [evens, odds]; our rotate-half rotates
    (i, i + d/2). So HF row 2i must hold our row i and HF row 2i+1 our row d/2 + i; the outputs then agree in
    layout and every q·k product is unchanged.
    """
    half = rope_dim // 2
    if to_interleaved:
        order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
    else:
        order = torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))
    nope = head_width - rope_dim
    return torch.cat((torch.arange(nope), nope + order))


def _permute_rope_rows(weight: Tensor, heads: int, rope_dim: int, to_interleaved: bool) -> Tensor:
    rows = weight.reshape(heads, -1, weight.shape[-1])
    return rows[:, _rope_row_order(rows.shape[1], rope_dim, to_interleaved)].reshape(weight.shape)


KeyPair = tuple[str, str, Callable[[Tensor, bool], Tensor] | None]
"""(our key, HF key, transform(tensor, to_hf) or None for a plain copy)."""


def _attention_pairs(config: TransformerConfig, arch: HFArchitecture, ours: str, theirs: str) -> list[KeyPair]:
    attn = config.attention
    if attn.mla is None:
        names = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
        if attn.qkv_bias:
            names += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
        pairs: list[KeyPair] = [(f"{ours}.{n}", f"{theirs}.{n}", None) for n in names]
        if attn.qk_norm:
            pairs += [(f"{ours}.q_norm.weight", f"{theirs}.q_norm.weight", None)]
            pairs += [(f"{ours}.k_norm.weight", f"{theirs}.k_norm.weight", None)]
        return pairs
    mla = attn.mla
    rope = mla.qk_rope_head_dim

    def query_rows(weight: Tensor, to_hf: bool) -> Tensor:
        return _permute_rope_rows(weight, attn.num_heads, rope, to_interleaved=to_hf)

    def latent_rows(weight: Tensor, to_hf: bool) -> Tensor:
        return _permute_rope_rows(weight, 1, rope, to_interleaved=to_hf)

    pairs = [
        (f"{ours}.kv_a_proj.weight", f"{theirs}.kv_a_proj_with_mqa.weight", latent_rows),
        (f"{ours}.kv_a_norm.weight", f"{theirs}.kv_a_layernorm.weight", None),
        (f"{ours}.kv_b_proj.weight", f"{theirs}.kv_b_proj.weight", None),
        (f"{ours}.o_proj.weight", f"{theirs}.o_proj.weight", None),
    ]
    if mla.q_lora_rank is None:
        return [(f"{ours}.q_proj.weight", f"{theirs}.q_proj.weight", query_rows), *pairs]
    return [
        (f"{ours}.q_a_proj.weight", f"{theirs}.q_a_proj.weight", None),
        (f"{ours}.q_a_norm.weight", f"{theirs}.q_a_layernorm.weight", None),
        (f"{ours}.q_b_proj.weight", f"{theirs}.q_b_proj.weight", query_rows),
        *pairs,
    ]


def key_pairs(config: TransformerConfig, arch: HFArchitecture) -> list[KeyPair]:
    """Every one-to-one tensor correspondence (routed expert banks excluded; see :func:`to_hf_state_dict`)."""
    pairs: list[KeyPair] = [
        ("embed.weight", "model.embed_tokens.weight", None),
        ("final_norm.weight", "model.norm.weight", None),
    ]
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", None))
    mlp = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        pairs += [
            (f"{ours}.attn_norm.weight", f"{theirs}.input_layernorm.weight", None),
            (f"{ours}.ffn_norm.weight", f"{theirs}.post_attention_layernorm.weight", None),
            *_attention_pairs(config, arch, f"{ours}.attn", f"{theirs}.self_attn"),
        ]
        if not config.is_moe_layer(i):
            pairs += [(f"{ours}.ffn.{n}", f"{theirs}.mlp.{n}", None) for n in mlp]
            continue
        pairs.append((f"{ours}.ffn.router.weight", f"{theirs}.mlp.gate.weight", None))
        if arch == "deepseek_v3":
            pairs.append((f"{ours}.ffn.router.selection_bias", f"{theirs}.mlp.gate.e_score_correction_bias", None))
            pairs += [(f"{ours}.ffn.shared_experts.{n}", f"{theirs}.mlp.shared_experts.{n}", None) for n in mlp]
        elif arch == "qwen2_moe":
            pairs += [(f"{ours}.ffn.shared_experts.{n}", f"{theirs}.mlp.shared_expert.{n}", None) for n in mlp]
            pairs.append((f"{ours}.ffn.shared_expert_gate.weight", f"{theirs}.mlp.shared_expert_gate.weight", None))
    return pairs


BANKS = ("gate_proj", "up_proj", "down_proj")


def to_hf_state_dict(state: dict[str, Tensor], config: TransformerConfig, arch: HFArchitecture) -> dict[str, Tensor]:
    """Our model's state dict (plain expert banks) as HF checkpoint tensors.

    Args:
        state: ``Transformer.state_dict()``; routed banks ``blocks.{i}.ffn.experts.{gate,up}_proj`` (E, F, D)
            and ``down_proj`` (E, D, F).
        config: the model's architecture, exportable as ``arch``.
        arch: target architecture.

    Returns:
        HF key -> tensor; per-expert matrices are (F, D) / (D, F) views of the banks.

    Raises:
        ConfigError: a softmax (Qwen) router carries a non-zero selection bias, which the target lacks.
    """
    check_exportable(config, arch)
    out = {theirs: (fn(state[ours], True) if fn else state[ours]) for ours, theirs, fn in key_pairs(config, arch)}
    biased: list[int] = []
    for i in range(config.n_layers):
        if not config.is_moe_layer(i):
            continue
        if arch != "deepseek_v3" and bool(state[f"blocks.{i}.ffn.router.selection_bias"].any()):
            biased.append(i)
        for bank in BANKS:
            for expert, matrix in enumerate(state[f"blocks.{i}.ffn.experts.{bank}"].unbind(0)):
                out[f"model.layers.{i}.mlp.experts.{expert}.{bank}.weight"] = matrix
    if biased:
        raise ConfigError(
            f"router selection_bias is non-zero in layers {biased} (trained with moe.bias_update_rate > 0): "
            f"{arch} routes without a bias; export as deepseek_v3 or train with bias_update_rate: 0"
        )
    return out
