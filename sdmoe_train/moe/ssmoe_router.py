"""SSMoE: a frozen spectral router built from the experts' own singular vectors, blended with the learned one.

Implements "Eigenvectors of Experts are Training-free Non-collapsing Routers" (arXiv 2605.30992); section
numbers (§N) refer to the design notes ``docs/design/ssmoe.md``. Each expert gets a spectral row ``u_i``: for
each of its gate, up and transposed down matrices, the mean of the k right singular vectors best aligned
with the learned router row ``r_i`` (§2); tokens are routed by ``p = (1 − c)·softmax(Rx) + c·softmax(Ux/τ)``
(§3). This file owns the configuration, the router and its explicit refresh; the matrix algebra is in
:mod:`sdmoe_train.moe.ssmoe_rows`.

Sigmoid routers (DeepSeek-style), our documented equivalent of §3: the learned sigmoid scores ``s`` are
normalised to ``n = s / S`` with ``S = Σ_e s_e``, blended as ``(1 − c)·n + c·softmax(Ux/τ)``, and scaled
back by ``S``, i.e. ``scores = (1 − c)·s + c·S·softmax(Ux/τ)``. Selection (with the correction bias and
group limits), ``norm_topk_prob`` and ``routed_scaling_factor`` then act on these scores exactly as on
``s``: with ``norm_topk_prob`` the output weights are the renormalised blended probabilities, and without
it they keep the sigmoid scale the model was trained with. ``c = 0`` reproduces the learned router bit
for bit in both families, because ``1·s + 0·q`` is ``s`` in floating point.
"""

# Shape key: T tokens, D model width, E experts, K experts per token, L MoE layers.

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdmoe_train.errors import ConfigError
from sdmoe_train.moe.diagnostics import load_health
from sdmoe_train.moe.experts import MATRIX_TYPES, ExpertBank
from sdmoe_train.moe.layer import MoELayer, MoEModel
from sdmoe_train.moe.router import Router, RoutingDecision
from sdmoe_train.moe.ssmoe_rows import SignMode, Variant, spectral_router_rows

SPECTRAL_ROWS = "spectral_rows"
"""Name of the router buffer holding U (E, D); its state_dict keys end in ``router.spectral_rows``."""


@dataclass(kw_only=True)
class SSMoEConfig:
    """SSMoE spectral routing; ``enabled: false`` leaves the learned routers (and the state_dict) untouched."""

    enabled: bool = False
    """Replace every MoE router by the blended learned + spectral router."""
    c: float = 0.5
    """Blend weight of the spectral router in [0, 1]: 0 is exactly the learned router, 1 pure spectral routing."""
    k: int = 50
    """Singular vectors averaged per expert matrix; clamped to the matrix rank (the unique variant: to the
    smallest count of kept singular vectors over the layer's experts)."""
    tau: float = 1.0
    """Temperature of softmax(Ux / tau)."""
    refresh_every: int = 500
    """Optimizer steps between recomputations of U while training; 0 recomputes only on enabling and load."""
    variant: Variant = "full"
    """``full``: SVD of the experts as applied (proxies W_c + W_u[i] under SD-MoE); ``unique``: SVD of the
    SD-MoE unique parts W_u[i], aligned with the router row minus its common-subspace component (needs SD-MoE)."""
    sign: SignMode = "canonical"
    """``canonical`` flips each singular vector to point along the router row, which makes U independent of
    SVD sign conventions (CPU vs GPU); ``reference`` ranks by the raw signed alignment, like the public code."""
    unique_cutoff: float = 1e-4
    """Unique variant: singular values of W_u[i] below unique_cutoff · σ_max count as zero and are never picked."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.c <= 1.0:
            raise ConfigError(f"ssmoe.c={self.c} must lie in [0, 1] (0: learned router only, 1: spectral only)")
        if self.k < 1:
            raise ConfigError(f"ssmoe.k={self.k} must be >= 1 (the paper uses 50; it is clamped to the rank)")
        if not (math.isfinite(self.tau) and self.tau > 0.0):
            raise ConfigError(f"ssmoe.tau={self.tau} must be positive and finite (1.0 is the paper's setting)")
        if self.refresh_every < 0:
            raise ConfigError(
                f"ssmoe.refresh_every={self.refresh_every} must be >= 0 (0: recompute U only on enabling and load)"
            )
        if self.variant not in ("full", "unique"):
            raise ConfigError(f"ssmoe.variant={self.variant!r} must be 'full' or 'unique'")
        if self.sign not in ("canonical", "reference"):
            raise ConfigError(f"ssmoe.sign={self.sign!r} must be 'canonical' or 'reference'")
        if not 0.0 <= self.unique_cutoff < 1.0:
            raise ConfigError(f"ssmoe.unique_cutoff={self.unique_cutoff} must lie in [0, 1)")

    def rows_settings(self) -> tuple[int, str, str, float]:
        """The settings U depends on; a checkpoint's U is reused only when they match."""
        return (self.k, self.variant, self.sign, self.unique_cutoff)


@dataclass
class SpectralRoutingStats:
    """Per-forward diagnostics of one spectral router (§6), detached fp32 scalars."""

    spectral_entropy: Tensor
    """Mean entropy of softmax(Ux/τ) over tokens divided by log E (near 1: the spectral router only flattens)."""
    changed_share: Tensor
    """Share of the T·K selected (token, expert) pairs that the learned router alone (c = 0) would not pick."""


class SpectralRouter(Router):
    """The learned router plus a frozen spectral router U, blended with weight ``blend`` (§3).

    Shares the learned router's ``weight`` parameter and ``selection_bias`` buffer (same state_dict names)
    and adds the persistent buffer ``spectral_rows`` (E, D), fp32. U is computed only by :meth:`refresh`;
    loading a state_dict without it (a checkpoint trained without SSMoE) recomputes it from the loaded
    weights through the MoE layer's load hook installed by :func:`apply_spectral_routing`. U needs every
    expert's weights, so SSMoE is refused under expert parallelism (``PretrainModule`` checks it).
    """

    def __init__(self, base: Router, config: SSMoEConfig) -> None:
        # Router.__init__ would allocate a new weight; this router takes over the base's tensors.
        nn.Module.__init__(self)
        self.config = base.config
        self.ssmoe = config
        self.blend = config.c
        self.weight = base.weight
        self.register_buffer("selection_bias", base.selection_bias, persistent=True)
        rows_ED = torch.zeros(base.weight.shape, dtype=torch.float32, device=base.weight.device)
        self.register_buffer(SPECTRAL_ROWS, rows_ED, persistent=True)
        self.rows_missing_after_load = False
        self.last_stats: SpectralRoutingStats | None = None
        self.row_geometry: dict[str, Tensor] = {}

    def forward(self, x_TD: Tensor, routing_stats: bool = True) -> RoutingDecision:
        """Route tokens by the blended scores; aux/z-loss inputs stay those of the learned router.

        Args:
            x_TD: hidden states of T tokens, any float dtype.
            routing_stats: record this pass's statistics for :meth:`diagnostics`; False (inference) keeps
                those of the last pass that recorded them.

        Returns:
            The routing decision (fp32); ``logits_TE`` and ``probs_TE`` are the learned router's.
        """
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            logits_TE = F.linear(x_TD, self.weight.float())
            spectral_probs_TE = (F.linear(x_TD, self.spectral_rows.float()) / self.ssmoe.tau).softmax(dim=-1)
        learned_scores_TE, probs_TE = self._scores(logits_TE)
        spectral_share_TE = self.blend * spectral_probs_TE
        if self.config.score_fn == "sigmoid":
            spectral_share_TE = spectral_share_TE * learned_scores_TE.sum(dim=-1, keepdim=True)
        scores_TE = (1.0 - self.blend) * learned_scores_TE + spectral_share_TE
        decision = self._decide(logits_TE, scores_TE, probs_TE)
        if routing_stats:
            self.last_stats = self._stats(spectral_probs_TE, learned_scores_TE, decision.expert_ids_TK)
        return decision

    @torch.no_grad()
    def _stats(
        self, spectral_probs_TE: Tensor, learned_scores_TE: Tensor, expert_ids_TK: Tensor
    ) -> SpectralRoutingStats:
        num_experts = spectral_probs_TE.shape[-1]
        entropy = torch.special.entr(spectral_probs_TE).sum(dim=-1).mean() / math.log(num_experts)
        if self.blend == 0.0:
            return SpectralRoutingStats(entropy, entropy.new_zeros(()))
        learned_ids_TK = self._select(learned_scores_TE)
        chosen_TE = torch.zeros_like(spectral_probs_TE, dtype=torch.bool).scatter_(1, expert_ids_TK, True)
        learned_TE = torch.zeros_like(chosen_TE).scatter_(1, learned_ids_TK, True)
        kept = (chosen_TE & learned_TE).sum().float() / expert_ids_TK.numel()
        return SpectralRoutingStats(entropy, 1.0 - kept)

    @torch.no_grad()
    def refresh(self, experts: ExpertBank) -> None:
        """Recompute U from the current expert weights and router rows (§2, §4), and its geometry."""
        rows_ED = spectral_router_rows(experts, self.weight, self.ssmoe)
        self.spectral_rows.copy_(rows_ED)
        self.row_geometry = spectral_row_geometry(rows_ED, self.weight)

    def diagnostics(self) -> dict[str, Tensor]:
        """§6 diagnostics that need no loads: row geometry (last refresh) and the last forward's statistics."""
        values = dict(self.row_geometry)
        if self.last_stats is not None:
            values["spectral_entropy"] = self.last_stats.spectral_entropy
            values["changed_share"] = self.last_stats.changed_share
        return values

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + SPECTRAL_ROWS
        self.rows_missing_after_load = key not in state_dict
        super()._load_from_state_dict(state_dict, prefix, *args)
        missing_keys: list[str] = args[2]
        if self.rows_missing_after_load and key in missing_keys:
            # Not an error: U is derived from weights, and the MoE layer's load hook recomputes it.
            missing_keys.remove(key)


@torch.no_grad()
def spectral_row_geometry(rows_ED: Tensor, router_weight_ED: Tensor) -> dict[str, Tensor]:
    """Mean pairwise ``cos(u_i, u_j)`` (i ≠ j) and mean ``cos(u_i, r_i)`` (§6).

    Args:
        rows_ED: the spectral router U.
        router_weight_ED: the learned router rows R.

    Returns:
        ``{"row_cos_mean": ..., "learned_cos_mean": ...}``, fp32 scalars.
    """
    unit_ED = F.normalize(rows_ED.float(), dim=-1)
    num_experts = unit_ED.shape[0]
    gram_EE = unit_ED @ unit_ED.T
    off_diagonal = (gram_EE.sum() - gram_EE.diagonal().sum()) / max(num_experts * (num_experts - 1), 1)
    learned = (unit_ED * F.normalize(router_weight_ED.float(), dim=-1)).sum(dim=-1).mean()
    return {"row_cos_mean": off_diagonal, "learned_cos_mean": learned}


def spectral_routers(model: nn.Module) -> list[tuple[MoELayer, SpectralRouter]]:
    """(layer, router) for every MoE layer whose router is spectral, in module order."""
    return [
        (module, module.router)
        for module in model.modules()
        if isinstance(module, MoELayer) and isinstance(module.router, SpectralRouter)
    ]


def is_spectral_state(state: dict[str, Any]) -> bool:
    """Whether a model ``state_dict`` holds SSMoE spectral routers."""
    return any(key.endswith("router." + SPECTRAL_ROWS) for key in state)


def without_spectral_rows(state: dict[str, Any]) -> dict[str, Any]:
    """The ``state_dict`` minus every SSMoE buffer (what a model without SSMoE, or a fresh U, loads)."""
    return {key: value for key, value in state.items() if not key.endswith("router." + SPECTRAL_ROWS)}


def apply_spectral_routing(model: MoEModel, config: SSMoEConfig) -> None:
    """Swap every MoE router for a :class:`SpectralRouter` and compute U now ("on enabling", §4).

    Call after SD-MoE decoupling (the ``unique`` variant reads its parts). Nothing is done when
    ``config.enabled`` is false. On a meta-device model U is left to :func:`refresh_spectral_routers`,
    once the weights exist.

    Raises:
        ConfigError: the model has no MoE layer, or ``variant: unique`` without SD-MoE banks.
    """
    if not config.enabled:
        return
    layers = [layer for _, layer in model.moe_layers()]
    if any(isinstance(layer.router, SpectralRouter) for layer in layers):
        raise ValueError("the model already routes spectrally")
    if not layers:
        raise ConfigError("ssmoe.enabled=true needs an MoE model, but arch.moe is null (every layer is dense)")
    if config.variant == "unique" and not all(_has_unique_parts(layer.experts) for layer in layers):
        raise ConfigError(
            "ssmoe.variant=unique builds U from the SD-MoE unique parts W_u[i], but sdmoe.enabled=false; "
            "enable sdmoe or use ssmoe.variant=full"
        )
    for layer in layers:
        layer.router = SpectralRouter(layer.router, config)
        layer.register_load_state_dict_post_hook(_refresh_rows_missing_from_state)
        if not layer.router.weight.is_meta:
            layer.router.refresh(layer.experts)


def _has_unique_parts(experts: ExpertBank) -> bool:
    return any(experts.unique_part(matrix) is not None for matrix in MATRIX_TYPES)


def _refresh_rows_missing_from_state(layer: nn.Module, incompatible_keys: Any) -> None:
    # Runs after the layer's router and experts have loaded, so U is rebuilt from the loaded weights.
    router = layer.router
    if not isinstance(router, SpectralRouter) or router.weight.is_meta:
        return  # a meta-device model (shapes only) gets U when it is materialised
    if router.rows_missing_after_load:
        router.refresh(layer.experts)
        router.rows_missing_after_load = False
    else:
        router.row_geometry = spectral_row_geometry(router.spectral_rows, router.weight.detach())


def refresh_spectral_routers(model: nn.Module) -> None:
    """Recompute U of every spectral router from the current weights (§4)."""
    for layer, router in spectral_routers(model):
        router.refresh(layer.experts)


def set_spectral_blend(model: nn.Module, c: float) -> None:
    """Set the blend weight c of every spectral router (evaluation sweeps; training uses ``ssmoe.c``)."""
    if not 0.0 <= c <= 1.0:
        raise ConfigError(f"ssmoe.c={c} must lie in [0, 1]")
    for _, router in spectral_routers(model):
        router.blend = c


def spectral_diagnostics(model: MoEModel, tokens_per_expert_LE: Tensor | None = None) -> dict[str, Tensor]:
    """The §6 diagnostics of every spectral router, keyed ``ssmoe/<quantity>/layer_NN``.

    Per layer: ``row_cos_mean`` and ``learned_cos_mean`` (from the last refresh), ``spectral_entropy`` and
    ``changed_share`` (from the last forward), and, when the loads of that forward are given,
    ``load_entropy`` and ``dead_expert_fraction``.

    Args:
        model: a transformer with spectral routers.
        tokens_per_expert_LE: the last forward's expert loads (rows in ``model.moe_layers()`` order).

    Returns:
        Metric name to fp32 scalar tensor (no host sync).
    """
    metrics: dict[str, Tensor] = {}
    for position, (index, layer) in enumerate(model.moe_layers()):
        router = layer.router
        if not isinstance(router, SpectralRouter):
            continue
        values = router.diagnostics()
        if tokens_per_expert_LE is not None:
            health = load_health(tokens_per_expert_LE[position])
            values["load_entropy"] = health.normalised_entropy_L
            values["dead_expert_fraction"] = health.dead_fraction_L
        metrics.update({f"ssmoe/{name}/layer_{index:02d}": value for name, value in values.items()})
    return metrics
