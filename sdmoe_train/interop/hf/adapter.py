"""What a Hugging Face family adapter provides, and the mapping every family shares.

An adapter (one file per family under :mod:`sdmoe_train.interop.hf.families`) owns everything about its
transformers architecture: the ``config.json`` settings in both directions, the settings it cannot express
(refusals, each listed), and the names and layout of its tensors. The driver
(:mod:`sdmoe_train.interop.hf.driver`) applies an adapter without knowing which family it is.

Shared here, because every supported family spells them the same way: the trunk (embedding, norms, output
head, dense SwiGLU layers), grouped-query attention, the router weight and the routed experts. Routed
experts are written in the per-expert layout of released checkpoints (``mlp.experts.{e}.gate_proj.weight``),
which transformers 5 fuses into ``gate_up_proj`` while loading and splits again in ``save_pretrained``; the
fused layout is accepted on import too.
"""

# Shape key: E experts, F expert width, D model width.

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.models.config import TransformerConfig

KeyPair = tuple[str, str, Callable[[Tensor, bool], Tensor] | None]
"""(our key, HF key, transform(tensor, to_hf) or None for a plain copy)."""

BANKS = ("gate_proj", "up_proj", "down_proj")
"""Our routed-expert banks and the per-expert HF matrix names (the same three words)."""


class HFAdapter(ABC):
    """One transformers architecture (``model_type``) and how our :class:`TransformerConfig` maps onto it."""

    model_type: ClassVar[str]
    """``config.json`` ``model_type``, e.g. ``qwen2_moe``; also the ``--arch`` name of ``sdmoe-train export``."""
    model_class: ClassVar[str]
    """The transformers class that loads the exported directory, e.g. ``Qwen2MoeForCausalLM``."""
    exportable: ClassVar[bool] = True
    """False for families we only import (dense checkpoints, for sparse upcycling)."""
    stores_selection_bias: ClassVar[bool] = False
    """The family keeps the router's selection bias; otherwise it must be zero on export and is zero on import."""

    # --- configuration -------------------------------------------------------------------------------------

    def export_problems(self, config: TransformerConfig) -> list[str]:
        """Every setting of ``config`` this family cannot express exactly (empty when export is exact)."""
        return []

    def hf_settings(self, config: TransformerConfig) -> dict[str, Any]:
        """The family's own ``config.json`` entries, merged over :func:`common_hf_settings`."""
        return {}

    @abstractmethod
    def config_from_hf(self, hf: dict[str, Any]) -> TransformerConfig:
        """Our config for this family's ``config.json``.

        Raises:
            ConfigError: listing every setting our model cannot express exactly.
        """

    def conversion_notes(self, config: TransformerConfig) -> list[str]:
        """Settings that are converted rather than copied between ``config`` and ``config.json``, one line each."""
        return []

    # --- tensors -------------------------------------------------------------------------------------------

    def attention_pairs(self, config: TransformerConfig, hf: dict[str, Any], ours: str, theirs: str) -> list[KeyPair]:
        """Tensors of one attention block (``ours`` = ``blocks.{i}.attn``, ``theirs`` = ``...self_attn``)."""
        return gqa_attention_pairs(config, ours, theirs)

    def moe_pairs(self, config: TransformerConfig, ours: str, theirs: str) -> list[KeyPair]:
        """One-to-one tensors of one MoE layer besides the routed banks: router, shared experts, their gate."""
        return [(f"{ours}.router.weight", f"{theirs}.gate.weight", None)]

    def key_pairs(self, config: TransformerConfig, hf: dict[str, Any]) -> list[KeyPair]:
        """Every one-to-one tensor correspondence (routed expert banks excluded; the driver maps those).

        Args:
            config: our architecture.
            hf: the ``config.json`` settings of the checkpoint (written or read), for layout flags.
        """
        pairs: list[KeyPair] = [
            ("embed.weight", "model.embed_tokens.weight", None),
            ("final_norm.weight", "model.norm.weight", None),
        ]
        if not config.tie_embeddings:
            pairs.append(("lm_head.weight", "lm_head.weight", None))
        for i in range(config.n_layers):
            ours, theirs = f"blocks.{i}", f"model.layers.{i}"
            pairs += [
                (f"{ours}.attn_norm.weight", f"{theirs}.input_layernorm.weight", None),
                (f"{ours}.ffn_norm.weight", f"{theirs}.post_attention_layernorm.weight", None),
                *self.attention_pairs(config, hf, f"{ours}.attn", f"{theirs}.self_attn"),
            ]
            if config.is_moe_layer(i):
                pairs += self.moe_pairs(config, f"{ours}.ffn", f"{theirs}.mlp")
            else:
                pairs += [(f"{ours}.ffn.{n}.weight", f"{theirs}.mlp.{n}.weight", None) for n in BANKS]
        return pairs

    def check_exportable(self, config: TransformerConfig) -> None:
        """Raise a :class:`ConfigError` listing every setting this family cannot express exactly."""
        problems = self.export_problems(config)
        if problems:
            raise ConfigError(
                f"cannot export exactly as {self.model_type} ({self.model_class}); differing settings:\n  - "
                + "\n  - ".join(problems)
            )


def common_hf_settings(config: TransformerConfig, adapter: HFAdapter, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` entries every family shares, from our config."""
    assert config.moe is not None
    return {
        "architectures": [adapter.model_class],
        "model_type": adapter.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.attention.num_heads,
        "intermediate_size": config.dense_hidden_dim,
        "moe_intermediate_size": config.moe.expert_hidden_dim,
        "num_experts_per_tok": config.moe.top_k,
        "norm_topk_prob": config.moe.norm_topk_prob,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.attention.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def common_config_fields(hf: dict[str, Any], problems: list[str]) -> tuple[dict[str, Any], float]:
    """Our trunk settings of any family's ``config.json``, and its RoPE theta; appends what we cannot express.

    Returns:
        (``TransformerConfig`` keyword arguments besides ``attention`` and ``moe``, ``rope_theta``).
    """
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}: our experts are SwiGLU (silu)")
    if hf.get("use_sliding_window", False):
        problems.append("use_sliding_window=true: our attention is full causal")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_parameters.rope_type={rope_type!r}: only plain RoPE ('default') is implemented")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    fields = {
        "vocab_size": hf["vocab_size"],
        "hidden_dim": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "dense_hidden_dim": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 4096),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "init_std": hf.get("initializer_range", 0.02),
    }
    return fields, theta


def routed_experts(hf: dict[str, Any]) -> int:
    """Routed experts per MoE layer of a ``config.json`` (0 when it names none)."""
    # transformers 5 saves Qwen3-MoE's num_experts under its attribute_map name num_local_experts.
    for name in ("n_routed_experts", "num_experts", "num_local_experts"):
        if hf.get(name) is not None:
            return hf[name]
    return 0


def refuse_import(model_type: str, problems: list[str]) -> None:
    """Raise a :class:`ConfigError` listing ``problems`` if there are any."""
    if problems:
        raise ConfigError(f"cannot import {model_type} exactly; differing settings:\n  - " + "\n  - ".join(problems))


def gqa_attention_pairs(config: TransformerConfig, ours: str, theirs: str) -> list[KeyPair]:
    """Grouped-query attention tensors, with q/k/v biases and per-head q/k norms when ``config`` has them."""
    attn = config.attention
    names = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    if attn.qkv_bias:
        names += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    if attn.qk_norm:
        names += ["q_norm.weight", "k_norm.weight"]
    return [(f"{ours}.{n}", f"{theirs}.{n}", None) for n in names]


def shared_expert_pairs(ours: str, theirs: str) -> list[KeyPair]:
    """The fused shared-expert SwiGLU (``ours`` = ``...ffn.shared_experts``) under a family's name ``theirs``."""
    return [(f"{ours}.{n}.weight", f"{theirs}.{n}.weight", None) for n in BANKS]


def moe_export_problems(config: TransformerConfig, model_type: str, has_qk_norm: bool = False) -> list[str]:
    """What no MoE family of transformers expresses (a dense model, capacity dropping), and q/k norms where the
    family has none. Adapters start their :meth:`HFAdapter.export_problems` with these."""
    if config.moe is None:
        return ["arch.moe=null (dense model): every export target is an MoE architecture"]
    problems = []
    if config.moe.capacity_factor is not None:
        capacity = config.moe.capacity_factor
        problems.append(f"moe.capacity_factor={capacity}: transformers routes dropless (set capacity_factor: null)")
    if config.attention.qk_norm and not has_qk_norm:
        problems.append(f"attention.qk_norm=true: {model_type} has no per-head q/k norm (export as a family with one)")
    return problems
