"""The load-balancing coefficient conversion against transformers' own Switch loss (``load_balancing_loss_func``).

Ours: each MoE layer's ``MoELayer`` statistics (``load_balance_loss``, 1 under uniform routing) summed over
layers and weighted by ``moe.aux_loss_coef``, i.e. the ``MoEAux.loss`` training adds. Theirs: the pooled loss
of all layers' router logits (``top_k`` under uniform routing) weighted by the exported
``router_aux_loss_coef``. With the conversion both add the same loss and the same gradient to the router
logits when every layer routes alike, and nearly the same when routing is near uniform.
"""

from __future__ import annotations

import pytest
import torch

from sdmoe_train.interop.hf.aux_loss import hf_router_aux_loss_coef, moe_layer_count, our_aux_loss_coef
from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.layer import MoELayer

transformers = pytest.importorskip("transformers")
load_balancing_loss_func = pytest.importorskip(
    "transformers.models.qwen2_moe.modeling_qwen2_moe"
).load_balancing_loss_func

pytestmark = pytest.mark.slow


def _config() -> TransformerConfig:
    """4 MoE layers after a dense one, top-2 of 8: the one-to-one copy would be off by 4 / 2 = 2x."""
    config = presets.tiny_qwen_moe()
    config.n_layers, config.vocab_size, config.hidden_dim, config.max_seq_len = 5, 64, 32, 16
    config.moe.first_k_dense, config.moe.aux_loss_coef, config.moe.z_loss_coef = 1, 0.01, 0.0
    return config


def _our_layer_loss(layer: MoELayer, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficient-weighted balancing loss our training adds for this layer, the router logits it saw)."""
    _, stats = layer(x_TD.unsqueeze(0))
    return stats.weighted_loss, layer.router(x_TD).logits_TE


def test_converted_coefficients_round_trip_and_differ_from_a_plain_copy() -> None:
    config = _config()
    assert moe_layer_count(config) == 4
    exported = hf_router_aux_loss_coef(config)
    assert exported == pytest.approx(0.01 * 4 / 2)
    assert our_aux_loss_coef(exported, top_k=2, moe_layers=4) == 0.01


def test_same_routing_in_every_layer_gives_the_same_loss_and_router_gradient() -> None:
    config = _config()
    model = Transformer(config)
    layers = [layer for _, layer in model.moe_layers()]
    for layer in layers[1:]:  # every layer routes exactly as the first
        layer.load_state_dict(layers[0].state_dict())
    x_TD = torch.randn(48, config.hidden_dim)

    ours_terms, logits = zip(*(_our_layer_loss(layer, x_TD) for layer in layers), strict=True)
    ours = torch.stack(ours_terms).sum()
    theirs = hf_router_aux_loss_coef(config) * load_balancing_loss_func(
        tuple(logits), config.moe.num_experts, config.moe.top_k
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)

    router = layers[0].router.weight
    (ours_grad,) = torch.autograd.grad(ours, router, retain_graph=True)
    (theirs_grad,) = torch.autograd.grad(theirs, router)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-9)


def test_near_uniform_routing_in_different_layers_gives_nearly_the_same_loss() -> None:
    config = _config()
    config.init_std = 1e-3  # router logits near zero: near-uniform probabilities, as at the start of training
    model = Transformer(config)
    captured: list[torch.Tensor] = []
    for _, layer in model.moe_layers():
        layer.router.register_forward_hook(lambda module, args, output: captured.append(output.logits_TE))
    out = model(torch.randint(0, config.vocab_size, (4, 16)))

    theirs = hf_router_aux_loss_coef(config) * load_balancing_loss_func(
        tuple(captured), config.moe.num_experts, config.moe.top_k
    )
    torch.testing.assert_close(out.moe.loss, theirs, rtol=1e-3, atol=0)
    # The one-to-one copy of the coefficient would have been off by (MoE layers) / top_k = 2.
    copied = config.moe.aux_loss_coef * load_balancing_loss_func(tuple(captured), config.moe.num_experts, 2)
    assert copied.item() == pytest.approx(out.moe.loss.item() / 2, rel=1e-3)
