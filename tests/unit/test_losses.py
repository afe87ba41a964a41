"""Balancing and z losses against hand-computed values, and the MoELayer statistics built from them."""

# Shape key: B sequences, S tokens per sequence, T = B·S tokens, D model width, E experts,
# K experts per token.

from __future__ import annotations

import math

import pytest
import torch

from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models.presets import tiny_deepseek_moe
from sdmoe_train.models.transformer import language_model_loss
from sdmoe_train.moe.config import MoEConfig
from sdmoe_train.moe.dispatch import expert_capacity
from sdmoe_train.moe.layer import MoELayer
from sdmoe_train.moe.losses import load_balance_loss, router_z_loss, sequence_balance_loss

# 2 sequences x 3 tokens, 4 experts, top-2. Each row of probabilities sums to 1.
PROBS_TE = torch.tensor(
    [
        [0.40, 0.30, 0.20, 0.10],  # sequence 0
        [0.10, 0.50, 0.30, 0.10],
        [0.40, 0.10, 0.10, 0.40],
        [0.25, 0.25, 0.25, 0.25],  # sequence 1
        [0.10, 0.20, 0.30, 0.40],
        [0.50, 0.20, 0.20, 0.10],
    ]
)
EXPERT_IDS_TK = torch.tensor([[0, 1], [1, 2], [0, 3], [0, 1], [3, 2], [0, 2]])
NUM_EXPERTS, TOP_K, NUM_SEQUENCES, SEQ_LEN = 4, 2, 2, 3
NUM_TOKENS = NUM_SEQUENCES * SEQ_LEN

# Copies per expert: e0 <- t0 t2 t3 t5, e1 <- t0 t1 t3, e2 <- t1 t4 t5, e3 <- t2 t4.
COUNTS_E = [4, 3, 3, 2]
# Column sums of PROBS_TE, i.e. T times the mean probability of each expert.
PROB_SUMS_E = [
    0.40 + 0.10 + 0.40 + 0.25 + 0.10 + 0.50,  # 1.75
    0.30 + 0.50 + 0.10 + 0.25 + 0.20 + 0.20,  # 1.55
    0.20 + 0.30 + 0.10 + 0.25 + 0.30 + 0.20,  # 1.35
    0.10 + 0.10 + 0.40 + 0.25 + 0.40 + 0.10,  # 1.35
]
# E / (K·T) · Σ_e count_e · sum_e / T = 4/12 · (4·1.75 + 3·1.55 + 3·1.35 + 2·1.35) / 6 = 18.4 / 18
EXPECTED_LOAD_BALANCE = (
    NUM_EXPERTS / (TOP_K * NUM_TOKENS) * sum(c * s / NUM_TOKENS for c, s in zip(COUNTS_E, PROB_SUMS_E, strict=True))
)

# Sequence 0: counts e0 <- t0 t2, e1 <- t0 t1, e2 <- t1, e3 <- t2; probability sums 0.9, 0.9, 0.6, 0.6.
# Sequence 1: counts e0 <- t3 t5, e1 <- t3, e2 <- t4 t5, e3 <- t4; probability sums 0.85, 0.65, 0.75, 0.75.
SEQ_COUNTS_BE = [[2, 2, 1, 1], [2, 1, 2, 1]]
SEQ_PROB_SUMS_BE = [
    [0.40 + 0.10 + 0.40, 0.30 + 0.50 + 0.10, 0.20 + 0.30 + 0.10, 0.10 + 0.10 + 0.40],
    [0.25 + 0.10 + 0.50, 0.25 + 0.20 + 0.20, 0.25 + 0.30 + 0.20, 0.25 + 0.40 + 0.10],
]
# Per sequence E / (K·S) · Σ_e count_be · sum_be / S: 4/6 · 4.8/3 = 9.6/9 and 4/6 · 4.6/3 = 9.2/9;
# their mean is 18.8/18.
EXPECTED_SEQUENCE_BALANCE = (
    sum(
        NUM_EXPERTS / (TOP_K * SEQ_LEN) * sum(c * s / SEQ_LEN for c, s in zip(counts, sums, strict=True))
        for counts, sums in zip(SEQ_COUNTS_BE, SEQ_PROB_SUMS_BE, strict=True)
    )
    / NUM_SEQUENCES
)


def test_load_balance_loss_matches_hand_computed_value() -> None:
    assert pytest.approx(18.4 / 18) == EXPECTED_LOAD_BALANCE
    loss = load_balance_loss(PROBS_TE, EXPERT_IDS_TK)
    assert loss.shape == ()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(EXPECTED_LOAD_BALANCE, rel=1e-6)


def test_sequence_balance_loss_matches_hand_computed_value() -> None:
    assert pytest.approx(18.8 / 18) == EXPECTED_SEQUENCE_BALANCE
    loss = sequence_balance_loss(PROBS_TE, EXPERT_IDS_TK, NUM_SEQUENCES)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(EXPECTED_SEQUENCE_BALANCE, rel=1e-6)


def test_sequence_balance_loss_with_one_sequence_equals_load_balance_loss() -> None:
    torch.testing.assert_close(
        sequence_balance_loss(PROBS_TE, EXPERT_IDS_TK, 1), load_balance_loss(PROBS_TE, EXPERT_IDS_TK)
    )


def test_router_z_loss_matches_hand_computed_value() -> None:
    logits_TE = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]])
    log_sum_exps = [math.log(sum(math.exp(v) for v in row)) for row in logits_TE.tolist()]
    assert log_sum_exps[0] == pytest.approx(math.log(4.0))
    expected = sum(lse**2 for lse in log_sum_exps) / 3
    assert router_z_loss(logits_TE).item() == pytest.approx(expected, rel=1e-6)


def test_uniform_routing_gives_exactly_one_for_both_balance_losses() -> None:
    # 2 sequences x 2 tokens, top-2 of 4: every sequence sends one copy to each expert.
    probs_TE = torch.full((4, 4), 0.25)
    expert_ids_TK = torch.tensor([[0, 1], [2, 3], [3, 1], [0, 2]])
    assert load_balance_loss(probs_TE, expert_ids_TK).item() == 1.0
    assert sequence_balance_loss(probs_TE, expert_ids_TK, num_sequences=2).item() == 1.0


def test_sequence_loss_penalises_sequences_that_are_imbalanced_while_the_batch_is_balanced() -> None:
    # Sequence 0 uses only experts 0 and 1, sequence 1 only experts 2 and 3.
    probs_TE = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]])
    expert_ids_TK = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2]])
    # Batch: counts 2,2,2,2 and mean probs 1/4 each -> 4/8 · 2 = 1.
    assert load_balance_loss(probs_TE, expert_ids_TK).item() == pytest.approx(1.0)
    # Each sequence: counts 2,2,0,0 and mean probs 1/2,1/2,0,0 -> 4/4 · (2·0.5 + 2·0.5) = 2.
    assert sequence_balance_loss(probs_TE, expert_ids_TK, num_sequences=2).item() == pytest.approx(2.0)


def test_balance_loss_gradients_flow_to_probabilities_and_are_the_scaled_counts() -> None:
    probs_TE = PROBS_TE.clone().requires_grad_(True)
    load_balance_loss(probs_TE, EXPERT_IDS_TK).backward()
    # d loss / d p_te = E / (K·T) · count_e / T, the same for every token: counts act as constants.
    expected_row_E = torch.tensor([NUM_EXPERTS / (TOP_K * NUM_TOKENS) * c / NUM_TOKENS for c in COUNTS_E])
    torch.testing.assert_close(probs_TE.grad, expected_row_E.expand(NUM_TOKENS, -1))

    probs_TE.grad = None
    sequence_balance_loss(probs_TE, EXPERT_IDS_TK, NUM_SEQUENCES).backward()
    # d loss / d p_te = E / (K·S) · count_be / S / B for token t of sequence b.
    scale = NUM_EXPERTS / (TOP_K * SEQ_LEN) / SEQ_LEN / NUM_SEQUENCES
    expected_BE = torch.tensor(SEQ_COUNTS_BE, dtype=torch.float32) * scale
    torch.testing.assert_close(probs_TE.grad, expected_BE.repeat_interleave(SEQ_LEN, dim=0))


def test_z_loss_gradient_is_twice_the_log_sum_exp_times_softmax_over_tokens() -> None:
    logits_TE = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]], requires_grad=True)
    router_z_loss(logits_TE).backward()
    with torch.no_grad():
        expected_TE = 2 * logits_TE.logsumexp(dim=-1, keepdim=True) * logits_TE.softmax(dim=-1) / 2
    torch.testing.assert_close(logits_TE.grad, expected_TE)


# MoELayer statistics. Dims are multiples of 4 so CPU grouped_mm accepts the fp32 rows.


def _build_layer(hidden_dim: int = 8, **moe_kwargs) -> MoELayer:
    layer = MoELayer(hidden_dim, MoEConfig(**moe_kwargs))
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(std=0.5)
    return layer


@pytest.mark.parametrize(
    ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef"),
    [(0.01, 0.0, 0.0), (0.0, 0.1, 0.0), (0.0, 0.0, 0.001), (0.01, 0.1, 0.001)],
)
def test_weighted_loss_is_the_coefficient_weighted_sum_of_enabled_losses(
    aux_loss_coef: float, seq_aux_loss_coef: float, z_loss_coef: float
) -> None:
    layer = _build_layer(
        num_experts=4,
        top_k=2,
        expert_hidden_dim=8,
        aux_loss_coef=aux_loss_coef,
        seq_aux_loss_coef=seq_aux_loss_coef,
        z_loss_coef=z_loss_coef,
    )
    x_BSD = torch.randn(2, 5, 8)
    _, stats = layer(x_BSD)

    routing = layer.router(x_BSD.reshape(-1, 8))
    balance = load_balance_loss(routing.probs_TE, routing.expert_ids_TK)
    seq_balance = sequence_balance_loss(routing.probs_TE, routing.expert_ids_TK, num_sequences=2)
    z_loss = router_z_loss(routing.logits_TE)
    torch.testing.assert_close(stats.load_balance_loss, balance.detach())
    torch.testing.assert_close(stats.sequence_balance_loss, seq_balance.detach())
    torch.testing.assert_close(stats.z_loss, z_loss.detach())
    assert not stats.load_balance_loss.requires_grad  # logged values are detached
    assert stats.load_balance_loss.item() != pytest.approx(stats.sequence_balance_loss.item())

    expected = aux_loss_coef * balance + seq_aux_loss_coef * seq_balance + z_loss_coef * z_loss
    torch.testing.assert_close(stats.weighted_loss, expected)
    (grad_weight_DE,) = torch.autograd.grad(stats.weighted_loss, layer.router.weight)
    (expected_grad_DE,) = torch.autograd.grad(expected, layer.router.weight)
    torch.testing.assert_close(grad_weight_DE, expected_grad_DE)
    assert grad_weight_DE.abs().sum() > 0


def test_weighted_loss_is_zero_and_harmless_when_all_coefficients_are_zero() -> None:
    layer = _build_layer(num_experts=4, top_k=2, expert_hidden_dim=8)
    x_BSD = torch.randn(2, 5, 8)
    y_BSD, stats = layer(x_BSD)
    assert stats.weighted_loss.shape == ()
    assert stats.weighted_loss.item() == 0.0
    assert stats.load_balance_loss.item() > 0.0  # still logged

    (y_BSD.square().sum() + stats.weighted_loss).backward()
    grads_with_stats = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    y_again_BSD, _ = layer(x_BSD)
    y_again_BSD.square().sum().backward()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(grads_with_stats[name], param.grad, msg=name)


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
def test_dropped_fraction_matches_the_copies_the_dispatcher_drops(capacity_factor: float | None) -> None:
    layer = _build_layer(num_experts=4, top_k=2, expert_hidden_dim=8, capacity_factor=capacity_factor)
    x_BSD = torch.randn(2, 8, 8)
    _, stats = layer(x_BSD)

    x_TD = x_BSD.reshape(-1, 8)
    routing = layer.router(x_TD)
    counts_E = torch.bincount(routing.expert_ids_TK.flatten(), minlength=4)
    assert torch.equal(stats.tokens_per_expert_E, counts_E)  # counted before dropping
    batch = layer.dispatcher.dispatch(x_TD, routing.expert_ids_TK, routing.weights_TK)
    dropped_copies = 16 * 2 - batch.x_ND.shape[0]
    assert stats.dropped_fraction.dtype == torch.float32
    assert stats.dropped_fraction.item() == pytest.approx(dropped_copies / 32)
    if capacity_factor is None:
        assert dropped_copies == 0
    else:
        capacity = expert_capacity(16, 2, 4, capacity_factor)
        assert dropped_copies == (counts_E - capacity).clamp(min=0).sum().item() > 0


def test_dropped_fraction_on_hand_built_routing() -> None:
    # Router weight = 10·identity, so token t goes to the two experts with the largest entries of x_t.
    layer = _build_layer(hidden_dim=4, num_experts=4, top_k=2, expert_hidden_dim=4, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(4))
    x_BSD = torch.tensor([[[1.0, 0.5, 0, 0], [1.0, 0.5, 0, 0], [1.0, 0.5, 0, 0], [0, 0, 1.0, 0.5]]])
    _, stats = layer(x_BSD)
    # Counts 3, 3, 1, 1; capacity ceil(1.0 · 4 · 2 / 4) = 2, so experts 0 and 1 each drop one of 8 copies.
    assert stats.tokens_per_expert_E.tolist() == [3, 3, 1, 1]
    assert stats.dropped_fraction.item() == 0.25


def test_the_training_loss_is_the_lm_loss_plus_every_moe_layers_weighted_balancing_losses() -> None:
    arch = tiny_deepseek_moe()
    arch.vocab_size, arch.n_layers, arch.max_seq_len = 64, 3, 16
    arch.moe.aux_loss_coef, arch.moe.seq_aux_loss_coef, arch.moe.z_loss_coef = 0.1, 0.05, 0.01
    module = PretrainModule(arch)
    module.configure_model()
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    batch = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))

    loss = module.training_step(batch, 0)

    out = module.model(batch[:, :-1])
    assert out.moe is not None and len(out.moe.layer_indices) == 3 - arch.moe.first_k_dense
    balancing = (
        0.1 * out.moe.load_balance_loss_L.sum()
        + 0.05 * out.moe.sequence_balance_loss_L.sum()
        + 0.01 * out.moe.z_loss_L.sum()
    )
    assert balancing > 0.1, "the balancing losses must be large enough to see"
    torch.testing.assert_close(loss, language_model_loss(out.logits, batch[:, 1:]) + balancing, rtol=1e-6, atol=1e-6)
