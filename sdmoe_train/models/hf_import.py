"""Hugging Face checkpoint import: ``config.json`` to our :class:`TransformerConfig`, HF tensors to our state dict.

The inverse of :mod:`sdmoe_train.models.hf_export`, which owns the key correspondence; this file reads
the transformers settings and refuses any our model cannot reproduce exactly (non-default RoPE scaling,
sliding windows, non-prefix dense layers, biased attention).
"""

# Shape key: E experts, F expert width, D model width.

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.models.config import AttentionConfig, MLAConfig, MoEConfig, TransformerConfig
from sdmoe_train.models.hf_export import BANKS, DEEPSEEK_LATENT_NORM_EPS, HF_ARCHITECTURES, HFArchitecture, key_pairs

DENSE_KEY_LAYOUTS: dict[str, HFArchitecture] = {"qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
"""Dense checkpoints that can be imported (and upcycled), with the MoE sibling whose tensor names they share."""


def detect_hf_architecture(hf: dict[str, Any]) -> str:
    """The ``model_type`` of a ``config.json`` if we can import it (an MoE target or a dense Qwen)."""
    arch = hf.get("model_type")
    supported = (*HF_ARCHITECTURES, *DENSE_KEY_LAYOUTS)
    if arch not in supported:
        raise ConfigError(f"config.json model_type={arch!r} is not supported; supported: {', '.join(supported)}")
    return arch


def key_layout(model_type: str) -> HFArchitecture:
    """The architecture whose tensor names ``model_type`` checkpoints use."""
    return DENSE_KEY_LAYOUTS.get(model_type, model_type)


def _rope_theta(hf: dict[str, Any], problems: list[str]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_parameters.rope_type={rope_type!r}: only plain RoPE ('default') is implemented")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _routed_experts(hf: dict[str, Any]) -> int:
    # transformers 5 saves Qwen3-MoE's num_experts under its attribute_map name num_local_experts.
    for name in ("n_routed_experts", "num_experts", "num_local_experts"):
        if hf.get(name) is not None:
            return hf[name]
    return 0


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """Our :class:`TransformerConfig` for a transformers ``config.json``.

    Training-only settings the checkpoint does not carry (balancing coefficients, bias update rate) keep our
    defaults, except ``router_aux_loss_coef`` which becomes ``moe.aux_loss_coef``.

    Raises:
        ConfigError: listing every setting our model cannot express exactly.
    """
    arch = detect_hf_architecture(hf)
    problems: list[str] = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}: our experts are SwiGLU (silu)")
    if hf.get("use_sliding_window", False):
        problems.append("use_sliding_window=true: our attention is full causal")
    theta = _rope_theta(hf, problems)
    layers = hf["num_hidden_layers"]
    common = {
        "vocab_size": hf["vocab_size"],
        "hidden_dim": hf["hidden_size"],
        "n_layers": layers,
        "dense_hidden_dim": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 4096),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "init_std": hf.get("initializer_range", 0.02),
    }
    if arch == "deepseek_v3":
        heads = hf["num_attention_heads"]
        if hf.get("num_key_value_heads", heads) != heads:
            problems.append(f"num_key_value_heads={hf['num_key_value_heads']}: MLA needs num_attention_heads={heads}")
        if hf.get("attention_bias", False):
            problems.append("attention_bias=true: our MLA projections have no bias")
        if common["norm_eps"] != DEEPSEEK_LATENT_NORM_EPS:
            problems.append(f"rms_norm_eps={common['norm_eps']}: our MLA latent norms would use it, HF's use 1e-6")
        attention = AttentionConfig(
            num_heads=heads,
            num_kv_heads=heads,
            rope_theta=theta,
            mla=MLAConfig(
                q_lora_rank=hf.get("q_lora_rank"),
                kv_lora_rank=hf["kv_lora_rank"],
                qk_nope_head_dim=hf["qk_nope_head_dim"],
                qk_rope_head_dim=hf["qk_rope_head_dim"],
                v_head_dim=hf["v_head_dim"],
            ),
        )
        moe = MoEConfig(
            num_experts=_routed_experts(hf),
            top_k=hf["num_experts_per_tok"],
            expert_hidden_dim=hf["moe_intermediate_size"],
            num_shared_experts=hf.get("n_shared_experts") or 0,
            score_fn="sigmoid",
            norm_topk_prob=hf.get("norm_topk_prob", True),
            routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            group_score_fn="top2_sum",
            first_k_dense=hf.get("first_k_dense_replace") or 0,
        )
    else:
        family, dense_model = key_layout(arch), arch in DENSE_KEY_LAYOUTS
        dense_layers = list(hf.get("mlp_only_layers") or [])
        if hf.get("decoder_sparse_step", 1) != 1 or dense_layers != list(range(len(dense_layers))):
            problems.append(
                f"decoder_sparse_step={hf.get('decoder_sparse_step', 1)}, mlp_only_layers={dense_layers}: "
                "our dense layers must be the first k (moe.first_k_dense)"
            )
        if _routed_experts(hf) < 1 and not dense_model:
            problems.append(f"num_experts={_routed_experts(hf)}: an MoE checkpoint without experts")
        if family == "qwen3_moe" and hf.get("attention_bias", False):
            problems.append("attention_bias=true: qwen3_moe would bias o_proj too, which our attention lacks")
        # Listed before MoEConfig validation can stop at the first of them.
        _refuse_import(arch, problems)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        attention_kwargs: dict[str, Any] = {
            "num_heads": hf["num_attention_heads"],
            "num_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
            "head_dim": head_dim,
            "qkv_bias": hf.get("qkv_bias", True) if family == "qwen2_moe" else False,
            "rope_theta": theta,
            "qk_norm": family == "qwen3_moe",
        }
        attention = AttentionConfig(**attention_kwargs)
        shared = hf.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0
        moe = (
            None
            if dense_model
            else MoEConfig(
                num_experts=max(_routed_experts(hf), 1),
                top_k=hf["num_experts_per_tok"],
                expert_hidden_dim=hf["moe_intermediate_size"],
                num_shared_experts=1 if shared else 0,
                shared_expert_hidden_dim=shared or None,
                shared_expert_gate=bool(shared),
                score_fn="softmax",
                norm_topk_prob=hf.get("norm_topk_prob", False),
                first_k_dense=len(dense_layers),
                aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
            )
        )
    _refuse_import(arch, problems)
    return TransformerConfig(**common, attention=attention, moe=moe)


def _refuse_import(arch: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"cannot import {arch} exactly; differing settings:\n  - " + "\n  - ".join(problems))


def from_hf_state_dict(hf: dict[str, Tensor], config: TransformerConfig, arch: HFArchitecture) -> dict[str, Tensor]:
    """HF checkpoint tensors as our ``Transformer`` state dict (inverse of :func:`to_hf_state_dict`).

    Accepts routed experts per expert (released checkpoints) or fused (``mlp.experts.gate_up_proj`` (E, 2F, D),
    ``mlp.experts.down_proj`` (E, D, F), written by ``save_pretrained(save_original_format=False)``).

    Raises:
        ConfigError: tensors are missing or left over, naming them.
    """
    remaining = dict(hf)
    missing: list[str] = []

    def take(key: str) -> Tensor | None:
        if key not in remaining:
            missing.append(key)
            return None
        return remaining.pop(key)

    state: dict[str, Tensor] = {}
    for ours, theirs, fn in key_pairs(config, arch):
        tensor = take(theirs)
        if tensor is not None:
            state[ours] = fn(tensor, False) if fn else tensor
    moe = config.moe
    for i in range(config.n_layers):
        if not config.is_moe_layer(i):
            continue
        assert moe is not None
        prefix = f"model.layers.{i}.mlp.experts"
        if f"{prefix}.gate_up_proj" in remaining:
            gate_up = remaining.pop(f"{prefix}.gate_up_proj")
            state[f"blocks.{i}.ffn.experts.gate_proj"], state[f"blocks.{i}.ffn.experts.up_proj"] = gate_up.chunk(2, 1)
            state[f"blocks.{i}.ffn.experts.down_proj"] = take(f"{prefix}.down_proj")
        else:
            for bank in BANKS:
                matrices = [take(f"{prefix}.{e}.{bank}.weight") for e in range(moe.num_experts)]
                if all(m is not None for m in matrices):
                    state[f"blocks.{i}.ffn.experts.{bank}"] = torch.stack(matrices)
        if arch != "deepseek_v3":
            state[f"blocks.{i}.ffn.router.selection_bias"] = torch.zeros(moe.num_experts)
    if config.tie_embeddings:
        remaining.pop("lm_head.weight", None)
        if "embed.weight" in state:
            state["lm_head.weight"] = state["embed.weight"]
    # Multi-token-prediction layers (DeepSeek-V3's layer n_layers) are not part of the LM forward pass.
    leftover = [k for k in remaining if not k.startswith(f"model.layers.{config.n_layers}.")]
    if missing or leftover:
        raise ConfigError(
            f"checkpoint tensors do not match {arch} with this config.json: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {leftover[:8]}{'...' if len(leftover) > 8 else ''}"
        )
    return state
