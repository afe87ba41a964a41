"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): a dense model's MLPs become identical experts.

Every routed expert starts as a copy of its block's dense SwiGLU and the router is freshly initialised
(N(0, init_std²)), so routing is symmetric only in the weights it selects, not in its logits, and training
can pull the experts apart. With ``norm_topk_prob`` the selected weights sum to one, so the upcycled model
computes the dense model's function at initialisation (up to rounding).
"""

# Shape key: E experts, F expert width (the dense MLP width), D model width.

from __future__ import annotations

import dataclasses

import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.config import MoEConfig
from sdmoe_train.moe.mlp import SwiGLU


@torch.no_grad()
def upcycle_dense_model(dense: Transformer, num_experts: int, top_k: int = 2, seed: int = 0) -> Transformer:
    """A softmax top-k MoE copy of a dense model whose every expert equals the block's dense MLP.

    Args:
        dense: a model with ``config.moe`` None.
        num_experts: E routed experts per layer.
        top_k: experts per token; the selected weights are renormalised (``norm_topk_prob``).
        seed: seed of the router initialisation.

    Returns:
        A new model; ``dense`` is left untouched.

    Raises:
        ConfigError: ``dense`` already has MoE layers, or ``top_k``/``num_experts`` are invalid.
    """
    config = dense.config
    if config.moe is not None:
        raise ConfigError("--upcycle_experts needs a dense checkpoint, but this one already has MoE layers")
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden_dim=config.dense_hidden_dim,
        score_fn="softmax",
        norm_topk_prob=True,
    )
    with torch.device("meta"):
        upcycled = Transformer(dataclasses.replace(config, moe=moe))
    upcycled.to_empty(device=dense.embed.weight.device)
    shared = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    result = upcycled.load_state_dict(shared, strict=False)
    assert not result.unexpected_keys and all(".ffn." in key for key in result.missing_keys), result
    generator = torch.Generator().manual_seed(seed)
    for (_, layer), block in zip(upcycled.moe_layers(), dense.blocks, strict=True):
        mlp = block.ffn
        assert isinstance(mlp, SwiGLU)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator) * config.init_std)
        layer.router.selection_bias.zero_()
        for bank in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.experts, bank).copy_(getattr(mlp, bank).weight.expand(num_experts, -1, -1))
    if config.tie_embeddings:
        upcycled.lm_head.weight = upcycled.embed.weight
    return upcycled
