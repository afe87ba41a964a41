"""The load-balancing coefficient between transformers' pooled Switch loss and our per-layer losses.

transformers (``load_balancing_loss_func`` of Qwen2-MoE and Qwen3-MoE) pools the router logits of all n MoE
layers into one Switch loss ``E · Σ_e f_e · P_e`` whose load fractions f count all K selections of a token,
so it equals K (top_k) under uniform routing; the model adds ``router_aux_loss_coef`` times it. We add
``moe.aux_loss_coef`` times the sum of n per-layer losses ``E/K · Σ_e f_e · P_e`` (:mod:`sdmoe_train.moe.losses`),
each 1 under uniform routing. Copying the coefficient one-to-one would change the balancing strength by
n/K, so it is converted:

    router_aux_loss_coef = moe.aux_loss_coef · n / K

With it, both losses and their gradients agree exactly when every layer has the same load statistics (at
uniform routing, for instance); layers that route differently only differ in whether f and P are pooled
before or after the product.
"""

from __future__ import annotations

from sdmoe_train.models.config import TransformerConfig

_SIGNIFICANT_DIGITS = 12
"""The converted coefficient is rounded so that export followed by import gives back the same decimal."""


def moe_layer_count(config: TransformerConfig) -> int:
    """n: the MoE layers whose router logits transformers pools."""
    return sum(config.is_moe_layer(index) for index in range(config.n_layers))


def _rounded(value: float) -> float:
    return float(f"{value:.{_SIGNIFICANT_DIGITS}g}")


def hf_router_aux_loss_coef(config: TransformerConfig) -> float:
    """``router_aux_loss_coef`` that gives transformers' pooled loss the pressure of ``moe.aux_loss_coef``."""
    assert config.moe is not None
    return _rounded(config.moe.aux_loss_coef * moe_layer_count(config) / config.moe.top_k)


def our_aux_loss_coef(router_aux_loss_coef: float, top_k: int, moe_layers: int) -> float:
    """``moe.aux_loss_coef`` for a checkpoint trained with ``router_aux_loss_coef`` (the inverse conversion)."""
    return _rounded(router_aux_loss_coef * top_k / max(moe_layers, 1))


def conversion_note(config: TransformerConfig) -> str:
    """One line saying how ``moe.aux_loss_coef`` and ``router_aux_loss_coef`` correspond for ``config``."""
    assert config.moe is not None
    layers, top_k = moe_layer_count(config), config.moe.top_k
    return (
        f"moe.aux_loss_coef={config.moe.aux_loss_coef:g} <-> router_aux_loss_coef={hf_router_aux_loss_coef(config):g} "
        f"(= moe.aux_loss_coef x {layers} MoE layers / top_k {top_k}: transformers pools all layers into one "
        f"balancing loss that is top_k under uniform routing, ours sums per-layer losses that are 1 each)"
    )
