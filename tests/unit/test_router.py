"""Router semantics on hand-built logits: top-k, weights, group-limited selection, selection bias, fp32."""

# Shape key: T tokens, D model width, E experts, K experts per token.

from __future__ import annotations

import math

import pytest
import torch

from sdmoe_train.moe.config import MoEConfig
from sdmoe_train.moe.router import Router


def _identity_router(**moe_kwargs) -> Router:
    """A router whose logits equal its input (weight = identity, D = E)."""
    config = MoEConfig(**moe_kwargs)
    router = Router(config.num_experts, config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(config.num_experts))
    return router


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def _sorted_ids(expert_ids: torch.Tensor) -> list[list[int]]:
    return expert_ids.sort(dim=-1).values.tolist()


LOGITS_TE = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.5, -2.0]])


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_top_k_selects_the_experts_with_the_largest_scores(score_fn: str) -> None:
    router = _identity_router(num_experts=4, top_k=2, score_fn=score_fn)
    routing = router(LOGITS_TE)
    assert routing.expert_ids_TK.dtype == torch.int64
    assert _sorted_ids(routing.expert_ids_TK) == [[1, 3], [0, 2]]


def test_softmax_weights_are_the_softmax_probabilities_of_the_chosen_experts() -> None:
    router = _identity_router(num_experts=4, top_k=2, score_fn="softmax")
    routing = router(LOGITS_TE)
    denominators = [sum(math.exp(v) for v in row) for row in LOGITS_TE.tolist()]
    expected_TK = torch.tensor(
        [
            [math.exp(2.0) / denominators[0], math.exp(1.5) / denominators[0]],
            [math.exp(3.0) / denominators[1], math.exp(0.5) / denominators[1]],
        ]
    )
    torch.testing.assert_close(routing.weights_TK, expected_TK)
    assert routing.expert_ids_TK.tolist() == [[1, 3], [0, 2]]  # topk returns the best expert first
    assert (routing.weights_TK.sum(dim=-1) < 1.0).all()  # not renormalised without norm_topk_prob
    torch.testing.assert_close(routing.probs_TE, LOGITS_TE.softmax(dim=-1))


def test_sigmoid_probs_are_scores_normalised_over_experts() -> None:
    router = _identity_router(num_experts=4, top_k=2, score_fn="sigmoid")
    routing = router(LOGITS_TE)
    scores = [[_sigmoid(v) for v in row] for row in LOGITS_TE.tolist()]
    expected_TE = torch.tensor([[s / sum(row) for s in row] for row in scores])
    torch.testing.assert_close(routing.probs_TE, expected_TE)
    expected_weights_TK = torch.tensor([[scores[0][1], scores[0][3]], [scores[1][0], scores[1][2]]])
    torch.testing.assert_close(routing.weights_TK, expected_weights_TK)


@pytest.mark.parametrize("routed_scaling_factor", [1.0, 2.5])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_norm_topk_prob_renormalises_weights_to_the_scaling_factor(score_fn: str, routed_scaling_factor: float) -> None:
    router = _identity_router(
        num_experts=4,
        top_k=2,
        score_fn=score_fn,
        norm_topk_prob=True,
        routed_scaling_factor=routed_scaling_factor,
    )
    routing = router(LOGITS_TE)
    torch.testing.assert_close(routing.weights_TK.sum(dim=-1), torch.full((2,), routed_scaling_factor))
    score = math.exp if score_fn == "softmax" else _sigmoid  # softmax's denominator cancels
    first, second = score(2.0), score(1.5)
    expected_row0 = [
        routed_scaling_factor * first / (first + second),
        routed_scaling_factor * second / (first + second),
    ]
    torch.testing.assert_close(routing.weights_TK[0], torch.tensor(expected_row0))


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_routed_scaling_factor_multiplies_the_unnormalised_weights(score_fn: str) -> None:
    plain = _identity_router(num_experts=4, top_k=2, score_fn=score_fn)(LOGITS_TE)
    scaled = _identity_router(num_experts=4, top_k=2, score_fn=score_fn, routed_scaling_factor=2.5)(LOGITS_TE)
    assert torch.equal(scaled.expert_ids_TK, plain.expert_ids_TK)
    torch.testing.assert_close(scaled.weights_TK, 2.5 * plain.weights_TK)
    torch.testing.assert_close(scaled.probs_TE, plain.probs_TE)  # the balancing losses see unscaled scores


# Eight experts in four groups of two. Plain top-2 picks experts 0 and 4 (logits 5.0 and 4.5).
# Scored by "max", group 0 (5.0) beats group 2 (4.5); scored by "top2_sum", group 0 is the worst
# (sigmoid(5) + sigmoid(-5) = 1.0) and group 2 (sigmoid(4.5) + sigmoid(4.4) = 1.977) beats group 1 (1.962).
GROUPED_LOGITS_TE = torch.tensor([[5.0, -5.0, 4.0, 3.9, 4.5, 4.4, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("group_score_fn", "expected_ids"),
    [("max", [0, 1]), ("top2_sum", [4, 5])],
)
def test_group_limited_selection_only_picks_experts_of_the_best_group(
    group_score_fn: str, expected_ids: list[int]
) -> None:
    common = dict(num_experts=8, top_k=2, score_fn="sigmoid")
    plain = _identity_router(**common)(GROUPED_LOGITS_TE)
    assert _sorted_ids(plain.expert_ids_TK) == [[0, 4]]  # plain top-k mixes groups 0 and 2
    router = _identity_router(**common, n_group=4, topk_group=1, group_score_fn=group_score_fn)
    routing = router(GROUPED_LOGITS_TE)
    assert _sorted_ids(routing.expert_ids_TK) == [expected_ids]
    expected_weights = sorted(_sigmoid(GROUPED_LOGITS_TE[0, e].item()) for e in expected_ids)
    torch.testing.assert_close(routing.weights_TK.sort(dim=-1).values, torch.tensor([expected_weights]))


@pytest.mark.parametrize(
    ("group_score_fn", "expected_ids"),
    [("max", [0, 4, 5]), ("top2_sum", [2, 3, 4])],
)
def test_group_limited_selection_with_two_groups_stays_inside_them(
    group_score_fn: str, expected_ids: list[int]
) -> None:
    # Plain top-3 picks 0, 4, 7; expert 7 lies outside the two best groups under either group score.
    logits_TE = torch.tensor([[5.0, -5.0, 4.0, 3.9, 4.5, 1.0, 0.0, 4.2]])
    # group scores, max:      g0 5.0  g1 4.0   g2 4.5   g3 4.2   -> keep g0, g2: top-3 of {5.0, -5, 4.5, 1.0}
    # group scores, top2_sum: g0 1.0  g1 1.962 g2 1.720 g3 1.485 -> keep g1, g2: top-3 of {4.0, 3.9, 4.5, 1.0}
    plain = _identity_router(num_experts=8, top_k=3, score_fn="sigmoid")(logits_TE)
    assert _sorted_ids(plain.expert_ids_TK) == [[0, 4, 7]]
    router = _identity_router(
        num_experts=8, top_k=3, score_fn="sigmoid", n_group=4, topk_group=2, group_score_fn=group_score_fn
    )
    assert _sorted_ids(router(logits_TE).expert_ids_TK) == [expected_ids]


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_selection_bias_changes_which_experts_are_selected_but_not_their_weights(score_fn: str) -> None:
    logits_TE = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    router = _identity_router(num_experts=4, top_k=2, score_fn=score_fn)
    unbiased = router(logits_TE)
    router.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    biased = router(logits_TE)

    assert _sorted_ids(unbiased.expert_ids_TK) == [[0, 1]]
    assert _sorted_ids(biased.expert_ids_TK) == [[0, 3]]
    if score_fn == "softmax":
        denominator = sum(math.exp(v) for v in (2.0, 1.0, 0.0, -1.0))
        expected = {0: math.exp(2.0) / denominator, 3: math.exp(-1.0) / denominator}
    else:
        expected = {0: _sigmoid(2.0), 3: _sigmoid(-1.0)}
    for slot, expert in enumerate(biased.expert_ids_TK[0].tolist()):
        assert biased.weights_TK[0, slot].item() == pytest.approx(expected[expert], rel=1e-6)
    torch.testing.assert_close(biased.probs_TE, unbiased.probs_TE)
    torch.testing.assert_close(biased.logits_TE, unbiased.logits_TE)


def test_update_bias_raises_underloaded_and_lowers_overloaded_experts() -> None:
    router = _identity_router(num_experts=4, top_k=2, score_fn="sigmoid", bias_update_rate=0.01)
    tokens_per_expert_E = torch.tensor([10, 2, 6, 6])  # mean load 6: expert 0 over, 1 under, 2 and 3 on target
    router.update_bias(tokens_per_expert_E)
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    router.update_bias(torch.tensor([1, 7, 8, 8]))  # mean 6: expert 0 under, the others over
    torch.testing.assert_close(router.selection_bias, torch.tensor([0.0, 0.0, -0.01, -0.01]))


def test_update_bias_does_nothing_when_the_rate_is_zero() -> None:
    router = _identity_router(num_experts=4, top_k=2, score_fn="sigmoid", bias_update_rate=0.0)
    router.selection_bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
    router.update_bias(torch.tensor([10, 2, 6, 6]))
    assert router.selection_bias.tolist() == [0.5, -0.5, 0.25, 0.0]


def test_selection_bias_is_a_persistent_buffer_that_never_receives_gradient() -> None:
    router = _identity_router(num_experts=4, top_k=2, score_fn="sigmoid", bias_update_rate=0.01)
    router.selection_bias.copy_(torch.tensor([0.1, 0.0, -0.1, 0.2]))
    assert "selection_bias" in router.state_dict()
    assert torch.equal(router.state_dict()["selection_bias"], router.selection_bias)
    assert [name for name, _ in router.named_parameters()] == ["weight"]
    assert "selection_bias" in dict(router.named_buffers())

    x_TD = torch.randn(6, 4, requires_grad=True)
    routing = router(x_TD)
    (routing.weights_TK.sum() + routing.probs_TE.square().sum()).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert router.selection_bias.grad is None
    assert not router.selection_bias.requires_grad

    restored = _identity_router(num_experts=4, top_k=2, score_fn="sigmoid")
    restored.load_state_dict(router.state_dict())
    assert torch.equal(restored.selection_bias, router.selection_bias)


def test_router_math_is_fp32_for_bfloat16_inputs_and_weights() -> None:
    config = MoEConfig(num_experts=4, top_k=2, score_fn="sigmoid", norm_topk_prob=True)
    router = Router(8, config)
    torch.nn.init.normal_(router.weight)
    router = router.to(torch.bfloat16)
    x_TD = torch.randn(5, 8).to(torch.bfloat16)
    routing = router(x_TD)
    assert routing.logits_TE.dtype == torch.float32
    assert routing.probs_TE.dtype == torch.float32
    assert routing.weights_TK.dtype == torch.float32
    expected_logits_TE = x_TD.float() @ router.weight.float().T
    torch.testing.assert_close(routing.logits_TE, expected_logits_TE, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_router_math_is_fp32_under_bfloat16_autocast(score_fn: str) -> None:
    router = Router(8, MoEConfig(num_experts=4, top_k=2, score_fn=score_fn))
    torch.nn.init.normal_(router.weight)
    x_TD = torch.randn(5, 8)
    reference = router(x_TD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x_TD)
    assert routing.logits_TE.dtype == torch.float32
    assert routing.probs_TE.dtype == torch.float32
    assert routing.weights_TK.dtype == torch.float32
    # A bf16 matmul would differ in the third significant digit; the fp32 one matches to the bit.
    assert torch.equal(routing.logits_TE, reference.logits_TE)
    assert torch.equal(routing.expert_ids_TK, reference.expert_ids_TK)
    torch.testing.assert_close(routing.weights_TK, reference.weights_TK)
