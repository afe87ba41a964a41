"""SSMoE spectral routing: construction of U, blending, c = 0 identity, refresh/load, planted directions."""

# Shape key: T tokens, D model width, E experts, K experts per token, F expert width.

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdmoe_train.errors import ConfigError
from sdmoe_train.models.config import MoEConfig, TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.diagnostics import load_health
from sdmoe_train.moe.experts import ExpertBank
from sdmoe_train.moe.router import Router
from sdmoe_train.moe.sdmoe import SDMoEConfig, apply_spectral_decoupling
from sdmoe_train.moe.ssmoe_router import (
    SpectralRouter,
    SSMoEConfig,
    apply_spectral_routing,
    is_spectral_state,
    refresh_spectral_routers,
    set_spectral_blend,
    spectral_diagnostics,
    spectral_routers,
    spectral_row_geometry,
    without_spectral_rows,
)
from sdmoe_train.moe.ssmoe_rows import aligned_singular_mean, spectral_router_rows


def _bank(num_experts: int = 6, hidden_dim: int = 24, expert_hidden_dim: int = 10) -> ExpertBank:
    bank = ExpertBank(num_experts, hidden_dim, expert_hidden_dim)
    for param in bank.parameters():
        torch.nn.init.normal_(param)
    return bank


@torch.no_grad()
def _loop_rows(bank: ExpertBank, router_ED: torch.Tensor, k: int) -> torch.Tensor:
    """An independent per-expert, per-vector loop of docs/design/ssmoe.md §2 (canonical signs)."""
    rows = []
    for expert in range(bank.num_experts):
        matrices = (bank.gate_proj[expert], bank.up_proj[expert], bank.down_proj[expert].T)
        means = []
        for matrix in matrices:
            _, _, right_adjoint = torch.linalg.svd(matrix.double())
            rank = min(matrix.shape)
            vectors = []
            for j in range(rank):
                vector = right_adjoint[j]
                alignment = float(vector @ router_ED[expert].double())
                vectors.append((abs(alignment), vector if alignment >= 0 else -vector))
            vectors.sort(key=lambda pair: pair[0], reverse=True)
            chosen = [vector for _, vector in vectors[: min(k, rank)]]
            means.append(sum(chosen) / len(chosen))
        rows.append(sum(means) / 3)
    return torch.stack(rows).float()


@pytest.mark.parametrize("k", [1, 4, 50])
def test_batched_rows_equal_an_independent_per_expert_loop(k: int) -> None:
    bank = _bank()
    router_ED = torch.randn(6, 24)
    batched = spectral_router_rows(bank, router_ED, SSMoEConfig(k=k))
    torch.testing.assert_close(batched, _loop_rows(bank, router_ED, k), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_each_matrix_mean_has_norm_one_over_sqrt_k(k: int) -> None:
    matrix_EFD = torch.randn(5, 10, 24)
    means_ED = aligned_singular_mean(matrix_EFD, torch.randn(5, 24), k)
    torch.testing.assert_close(means_ED.norm(dim=-1), torch.full((5,), 1 / math.sqrt(k)))


def test_k_is_clamped_to_the_rank() -> None:
    matrix_EFD = torch.randn(3, 4, 24)
    means_ED = aligned_singular_mean(matrix_EFD, torch.randn(3, 24), k=50)
    torch.testing.assert_close(means_ED.norm(dim=-1), torch.full((3,), 1 / math.sqrt(4)))


def _svd_with_flipped_signs(generator: torch.Generator):
    real_svd = torch.linalg.svd

    def flipped(matrix: torch.Tensor, full_matrices: bool = True):
        left, singular, right_adjoint = real_svd(matrix, full_matrices=full_matrices)
        signs = torch.randint(0, 2, singular.shape, generator=generator).float() * 2 - 1
        return left * signs.unsqueeze(-2), singular, right_adjoint * signs.unsqueeze(-1)

    return flipped


def test_sign_flips_of_singular_vectors_leave_canonical_rows_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    bank = _bank()
    router_ED = torch.randn(6, 24)
    canonical = spectral_router_rows(bank, router_ED, SSMoEConfig(k=3))
    reference = spectral_router_rows(bank, router_ED, SSMoEConfig(k=3, sign="reference"))
    monkeypatch.setattr(torch.linalg, "svd", _svd_with_flipped_signs(torch.Generator().manual_seed(1)))
    torch.testing.assert_close(spectral_router_rows(bank, router_ED, SSMoEConfig(k=3)), canonical)
    # The reference mode keeps the raw signs, so the same flips change it: the check above can fail.
    flipped_reference = spectral_router_rows(bank, router_ED, SSMoEConfig(k=3, sign="reference"))
    assert not torch.allclose(flipped_reference, reference, atol=1e-3)


def test_rows_depend_on_the_router_only_through_the_selection() -> None:
    bank = _bank()
    router_ED = torch.randn(6, 24)
    rows = spectral_router_rows(bank, router_ED, SSMoEConfig(k=3))
    torch.testing.assert_close(spectral_router_rows(bank, 7.5 * router_ED, SSMoEConfig(k=3)), rows)


def _router(score_fn: str, **moe_kwargs) -> Router:
    config = MoEConfig(num_experts=8, top_k=2, score_fn=score_fn, **moe_kwargs)
    router = Router(16, config)
    torch.nn.init.normal_(router.weight)
    router.selection_bias.normal_(std=0.05)
    return router


ROUTER_SETTINGS = [
    ("softmax", {}),
    ("softmax", {"norm_topk_prob": True}),
    ("sigmoid", {"norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_group": 4, "topk_group": 2}),
    ("sigmoid", {}),
]


@pytest.mark.parametrize(("score_fn", "moe_kwargs"), ROUTER_SETTINGS)
def test_blend_zero_is_bit_identical_to_the_learned_router(score_fn: str, moe_kwargs: dict) -> None:
    learned = _router(score_fn, **moe_kwargs)
    spectral = SpectralRouter(learned, SSMoEConfig(enabled=True, c=0.0))
    spectral.refresh(_bank(8, 16, 8))
    x_TD = torch.randn(64, 16)
    expected, routed = learned(x_TD), spectral(x_TD)
    for field in ("expert_ids_TK", "weights_TK", "logits_TE", "probs_TE"):
        assert torch.equal(getattr(routed, field), getattr(expected, field)), field
    assert float(spectral.last_stats.changed_share) == 0.0
    set_blend = SpectralRouter(learned, SSMoEConfig(enabled=True, c=0.5))
    set_blend.refresh(_bank(8, 16, 8))
    assert not torch.equal(set_blend(x_TD).weights_TK, expected.weights_TK)


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
@pytest.mark.parametrize("c", [0.3, 0.7])
def test_a_partial_blend_weights_experts_by_the_documented_mixture(score_fn: str, c: float) -> None:
    # softmax: (1 - c) p + c q; sigmoid: (1 - c) s + c S q with S = sum of the sigmoid scores, so the
    # blend keeps the sigmoid scale (without norm_topk_prob the weights are these scores themselves).
    router = SpectralRouter(_router(score_fn), SSMoEConfig(enabled=True, c=c))
    router.refresh(_bank(8, 16, 8))
    x_TD = torch.randn(64, 16)
    learned_TE = F.linear(x_TD, router.weight)
    learned_TE = learned_TE.softmax(-1) if score_fn == "softmax" else learned_TE.sigmoid()
    spectral_TE = (F.linear(x_TD, router.spectral_rows) / router.ssmoe.tau).softmax(-1)
    scale_T1 = learned_TE.sum(-1, keepdim=True) if score_fn == "sigmoid" else 1.0
    expected_TE = (1 - c) * learned_TE + c * scale_T1 * spectral_TE
    routed = router(x_TD)
    expected_ids_TK = (expected_TE + router.selection_bias).topk(2, dim=-1).indices
    assert torch.equal(routed.expert_ids_TK, expected_ids_TK)
    torch.testing.assert_close(routed.weights_TK, expected_TE.gather(-1, expected_ids_TK))


@pytest.mark.parametrize(("score_fn", "moe_kwargs"), [("softmax", {}), ("sigmoid", {"norm_topk_prob": True})])
def test_blend_one_ignores_the_learned_rows_once_u_is_built(score_fn: str, moe_kwargs: dict) -> None:
    router = SpectralRouter(_router(score_fn, **moe_kwargs), SSMoEConfig(enabled=True, c=1.0))
    router.selection_bias.zero_()
    router.refresh(_bank(8, 16, 8))
    x_TD = torch.randn(64, 16)
    before = router(x_TD)
    with torch.no_grad():
        router.weight.normal_()
    after = router(x_TD)
    assert torch.equal(after.expert_ids_TK, before.expert_ids_TK)
    torch.testing.assert_close(after.weights_TK, before.weights_TK)
    assert not torch.equal(after.logits_TE, before.logits_TE)  # the learned logits did change


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_aux_inputs_stay_on_the_learned_router_and_loads_follow_the_final_selection(score_fn: str) -> None:
    learned = _router(score_fn)
    spectral = SpectralRouter(learned, SSMoEConfig(enabled=True, c=0.9))
    spectral.refresh(_bank(8, 16, 8))
    x_TD = torch.randn(256, 16)
    expected, routed = learned(x_TD), spectral(x_TD)
    assert torch.equal(routed.logits_TE, expected.logits_TE)
    assert torch.equal(routed.probs_TE, expected.probs_TE)
    assert not torch.equal(routed.expert_ids_TK, expected.expert_ids_TK)
    pairs = zip(routed.expert_ids_TK.tolist(), expected.expert_ids_TK.tolist(), strict=True)
    kept = sum(len(set(final) & set(alone)) for final, alone in pairs)
    torch.testing.assert_close(spectral.last_stats.changed_share, torch.tensor(1.0 - kept / 512))


def test_no_gradient_reaches_u_but_the_learned_router_still_trains() -> None:
    router = SpectralRouter(_router("softmax"), SSMoEConfig(enabled=True, c=0.5))
    router.refresh(_bank(8, 16, 8))
    assert not router.spectral_rows.requires_grad
    x_TD = torch.randn(32, 16, requires_grad=True)
    routed = router(x_TD)
    (routed.weights_TK.sum() + routed.probs_TE.square().sum()).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert router.spectral_rows.grad is None


def test_a_pass_without_routing_stats_routes_alike_and_keeps_the_last_recorded_statistics() -> None:
    spectral = SpectralRouter(_router("sigmoid"), SSMoEConfig(enabled=True, c=0.5))
    spectral.refresh(_bank(8, 16, 8))
    recorded_TD, inference_TD = torch.randn(64, 16), torch.randn(64, 16)
    spectral(recorded_TD)
    kept = spectral.last_stats
    routed = spectral(inference_TD, routing_stats=False)
    assert spectral.last_stats is kept
    expected = spectral(inference_TD)
    assert spectral.last_stats is not kept
    for field in ("expert_ids_TK", "weights_TK"):
        assert torch.equal(getattr(routed, field), getattr(expected, field)), field


def _tiny_transformer(score_fn: str = "softmax") -> Transformer:
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=16, score_fn=score_fn)
    return Transformer(TransformerConfig(vocab_size=64, hidden_dim=32, n_layers=2, max_seq_len=16, moe=moe))


def test_enabling_builds_u_from_the_weights_and_it_changes_only_on_refresh() -> None:
    model = _tiny_transformer()
    apply_spectral_routing(model, SSMoEConfig(enabled=True, k=4))
    layer, router = spectral_routers(model)[0]
    expected = spectral_router_rows(layer.experts, router.weight, SSMoEConfig(k=4))
    assert torch.equal(router.spectral_rows, expected)
    before = router.spectral_rows.clone()
    with torch.no_grad():
        layer.experts.gate_proj.mul_(-3.0).add_(1.0)
    model(torch.randint(0, 64, (2, 8)))
    assert torch.equal(router.spectral_rows, before)
    refresh_spectral_routers(model)
    assert not torch.allclose(router.spectral_rows, before)


def test_saved_u_is_restored_as_is_and_missing_u_is_rebuilt_from_loaded_weights() -> None:
    source = _tiny_transformer()
    apply_spectral_routing(source, SSMoEConfig(enabled=True, k=4))
    # Weights move after the last refresh, as between two refreshes in training.
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.01 * torch.randn_like(param))
    state = source.state_dict()
    assert is_spectral_state(state) and not is_spectral_state(without_spectral_rows(state))
    saved_rows = [router.spectral_rows.clone() for _, router in spectral_routers(source)]

    restored = _tiny_transformer()
    apply_spectral_routing(restored, SSMoEConfig(enabled=True, k=4))
    restored.load_state_dict(state, strict=True)
    for (_, router), rows in zip(spectral_routers(restored), saved_rows, strict=True):
        assert torch.equal(router.spectral_rows, rows)
        assert set(router.row_geometry) == {"row_cos_mean", "learned_cos_mean"}

    rebuilt = _tiny_transformer()
    apply_spectral_routing(rebuilt, SSMoEConfig(enabled=True, k=4))
    rebuilt.load_state_dict(without_spectral_rows(state), strict=True)
    for layer, router in spectral_routers(rebuilt):
        assert torch.equal(router.spectral_rows, spectral_router_rows(layer.experts, router.weight, SSMoEConfig(k=4)))
    assert not torch.allclose(spectral_routers(rebuilt)[0][1].spectral_rows, saved_rows[0])


def test_disabled_leaves_the_model_and_its_state_untouched() -> None:
    model = _tiny_transformer()
    keys = set(model.state_dict())
    apply_spectral_routing(model, SSMoEConfig(enabled=False))
    assert set(model.state_dict()) == keys and not spectral_routers(model)


def test_unique_variant_needs_sdmoe_and_uses_the_unique_parts() -> None:
    model = _tiny_transformer()
    with pytest.raises(ConfigError, match="ssmoe.variant=unique .* sdmoe.enabled=false"):
        apply_spectral_routing(model, SSMoEConfig(enabled=True, variant="unique"))
    naive, unique = _tiny_transformer(), _tiny_transformer()
    for model in (naive, unique):
        apply_spectral_decoupling(model, SDMoEConfig(enabled=True, rank=4))
    unique.load_state_dict(naive.state_dict())
    apply_spectral_routing(naive, SSMoEConfig(enabled=True, k=3, variant="full"))
    apply_spectral_routing(unique, SSMoEConfig(enabled=True, k=3, variant="unique"))
    layer, router = spectral_routers(unique)[0]
    # Every unique-variant direction lies in the complement of the common hidden-space bases.
    for name, basis in (("gate", "right"), ("up", "right"), ("down", "left")):
        common_DC = getattr(layer.experts, f"{name}_proj_{basis}_basis")
        matrix = layer.experts.parts(name)[1]
        matrix_EFD = matrix.transpose(-2, -1) if name == "down" else matrix
        rows_ED = router.weight.detach() - (router.weight.detach() @ common_DC) @ common_DC.T
        directions = aligned_singular_mean(matrix_EFD.detach(), rows_ED, 3, cutoff=1e-4)
        assert (directions @ common_DC).abs().max() < 1e-4
    assert not torch.allclose(spectral_routers(naive)[0][1].spectral_rows, router.spectral_rows, atol=1e-3)


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_planted_directions_route_tokens_to_their_owner_despite_a_collapsed_router(score_fn: str) -> None:
    generator = torch.Generator().manual_seed(3)
    num_experts, hidden_dim, expert_dim = 8, 128, 8
    basis_DD = torch.linalg.qr(torch.randn(hidden_dim, hidden_dim, generator=generator)).Q
    owned_ED, common_D = basis_DD[:, :num_experts].T, basis_DD[:, num_experts]
    bank = ExpertBank(num_experts, hidden_dim, expert_dim)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            noise = 0.05 * torch.randn(getattr(bank, name).shape, generator=generator)
            strength_EF = 5 * torch.randn(num_experts, expert_dim, generator=generator)
            planted_EFD = strength_EF.unsqueeze(-1) * owned_ED.unsqueeze(1)
            getattr(bank, name).copy_((planted_EFD if name != "down_proj" else planted_EFD.transpose(1, 2)) + noise)
    # Collapsed learned router: near-identical rows, expert 0 dominant; each row leans slightly to its own a_i.
    learned = Router(hidden_dim, MoEConfig(num_experts=num_experts, top_k=1, score_fn=score_fn))
    with torch.no_grad():
        learned.weight.copy_(2 * common_D + owned_ED)
        learned.weight[0] += 2 * common_D
    owners_T = torch.randint(0, num_experts, (512,), generator=generator)
    x_TD = owned_ED[owners_T] + common_D + 0.02 * torch.randn(512, hidden_dim, generator=generator)
    learned_hits = (learned(x_TD).expert_ids_TK[:, 0] == owners_T).float().mean()
    router = SpectralRouter(learned, SSMoEConfig(enabled=True, c=1.0, k=2, tau=0.1))
    router.refresh(bank)
    spectral_hits = (router(x_TD).expert_ids_TK[:, 0] == owners_T).float().mean()
    assert learned_hits < 0.25  # the collapsed router sends almost everything to expert 0
    assert spectral_hits > 0.9  # chance is 1/8


def test_set_spectral_blend_and_load_health() -> None:
    model = _tiny_transformer()
    apply_spectral_routing(model, SSMoEConfig(enabled=True, c=0.5))
    set_spectral_blend(model, 0.0)
    assert all(router.blend == 0.0 for _, router in spectral_routers(model))
    with pytest.raises(ConfigError, match=r"ssmoe.c=1.5 must lie in \[0, 1\]"):
        set_spectral_blend(model, 1.5)
    health = load_health(torch.tensor([4, 4, 0, 0])).named()
    torch.testing.assert_close(health["load_entropy"], torch.tensor(math.log(2) / math.log(4)))
    torch.testing.assert_close(health["dead_expert_fraction"], torch.tensor(0.5))
    torch.testing.assert_close(health["load_cv"], torch.tensor(1.0))
    uniform = load_health(torch.tensor([3, 3, 3, 3])).named()
    torch.testing.assert_close(uniform["load_entropy"], torch.tensor(1.0))


def test_diagnostics_name_every_quantity_per_layer() -> None:
    model = _tiny_transformer("sigmoid")
    apply_spectral_routing(model, SSMoEConfig(enabled=True, c=0.5))
    out = model(torch.randint(0, 64, (2, 8)))
    metrics = spectral_diagnostics(model, out.moe.tokens_per_expert_LE)
    quantities = ("row_cos_mean", "learned_cos_mean", "spectral_entropy", "changed_share", "load_entropy")
    for layer in (0, 1):
        for quantity in (*quantities, "dead_expert_fraction"):
            assert f"ssmoe/{quantity}/layer_{layer:02d}" in metrics
    assert 0.0 < float(metrics["ssmoe/spectral_entropy/layer_00"]) <= 1.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("c", 1.5, r"ssmoe.c=1.5 must lie in \[0, 1\]"),
        ("k", 0, "ssmoe.k=0 must be >= 1"),
        ("tau", 0.0, "ssmoe.tau=0.0 must be positive and finite"),
        ("tau", float("inf"), "ssmoe.tau=inf must be positive and finite"),
        ("c", float("nan"), r"ssmoe.c=nan must lie in \[0, 1\]"),
        ("unique_cutoff", float("nan"), r"ssmoe.unique_cutoff=nan must lie in \[0, 1\)"),
        ("refresh_every", -1, "ssmoe.refresh_every=-1 must be >= 0"),
        ("variant", "naive", "ssmoe.variant='naive' must be 'full' or 'unique'"),
        ("sign", "raw", "ssmoe.sign='raw' must be 'canonical' or 'reference'"),
        ("unique_cutoff", 1.0, r"ssmoe.unique_cutoff=1.0 must lie in \[0, 1\)"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SSMoEConfig(**{field: value})


def test_refresh_stores_the_rows_of_the_current_experts_and_their_geometry() -> None:
    router = SpectralRouter(_router("softmax"), SSMoEConfig(enabled=True))
    bank = _bank(8, 16, 8)
    router.refresh(bank)
    expected_ED = spectral_router_rows(bank, router.weight, router.ssmoe)
    assert torch.equal(router.spectral_rows, expected_ED)
    assert router.row_geometry.keys() == spectral_row_geometry(expected_ED, router.weight).keys()
    with torch.no_grad():
        bank.gate_proj.mul_(-1.5).add_(0.3)
    router.refresh(bank)
    assert torch.equal(router.spectral_rows, spectral_router_rows(bank, router.weight, router.ssmoe))
    assert not torch.equal(router.spectral_rows, expected_ED)
