"""SD-MoE (arXiv 2602.12556): spectral init, gradient split, strict updates, refresh, merge, config checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.presets import tiny_qwen_moe
from sdmoe_train.models.transformer import Transformer, language_model_loss
from sdmoe_train.moe.experts import ExpertBank
from sdmoe_train.moe.sdmoe import (
    MATRIX_TYPES,
    DecoupledExpertBank,
    SDMoEConfig,
    apply_spectral_decoupling,
    decoupled_banks,
    finish_optimizer_step,
    merge_spectral_decoupling,
    project_gradients,
    refresh_bases,
    register_gradient_projection_hooks,
    strict_update_reference,
)
from sdmoe_train.moe.spectral import (
    fold_touching_parts_,
    project_common_gradient_,
    project_unique_gradient_,
    project_unique_update_,
    spectral_init,
    top_singular_bases,
    update_reference,
)

SHAPES = {"square": (24, 24), "tall": (40, 16), "wide": (16, 40)}


def _orthonormal(rows: int, cols: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator)).Q


def _complement_reference(grad_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> Tensor:
    """(I − P_U) G (I − P_V) with the projectors materialised: the slow, obvious definition."""
    eye_left = torch.eye(left_MK.shape[0], dtype=torch.float64)
    eye_right = torch.eye(right_NK.shape[0], dtype=torch.float64)
    left, right = left_MK.double(), right_NK.double()
    return (eye_left - left @ left.T) @ grad_EMN.double() @ (eye_right - right @ right.T)


def _tiny_arch() -> TransformerConfig:
    arch = tiny_qwen_moe()
    arch.n_layers, arch.vocab_size, arch.max_seq_len = 2, 64, 16
    arch.moe.expert_hidden_dim = 48
    arch.moe.aux_loss_coef = 0.0
    return arch


def _model(**sdmoe: object) -> Transformer:
    model = Transformer(_tiny_arch())
    apply_spectral_decoupling(model, SDMoEConfig(enabled=True, rank=4, **sdmoe))
    return model


def _backward(model: Transformer, seed: int = 0) -> None:
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    out = model(tokens)
    (language_model_loss(out.logits[:, :-1], tokens[:, 1:]) + out.moe.loss).backward()


# --- initialisation (docs/design/sdmoe.md §3) ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_spectral_init_puts_unique_parts_in_the_complement_with_the_tail_spectrum(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    weight_MN = torch.randn(shape, generator=generator) * 0.02
    init = spectral_init(weight_MN, rank=4, num_experts=3, generator=generator)
    left, right, common, unique = init.left_basis_MK, init.right_basis_NK, init.common_MN, init.unique_EMN

    scale = unique.abs().max()
    assert (left.T @ unique).abs().max() < 1e-5 * scale
    assert (unique @ right).abs().max() < 1e-5 * scale
    torch.testing.assert_close(left.T @ left, torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(right.T @ right, torch.eye(4), atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank(common) == 4
    expected = torch.linalg.svdvals(weight_MN).expand(3, -1)
    torch.testing.assert_close(torch.linalg.svdvals(common + unique), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(common, left @ torch.diag(expected[0, :4]) @ right.T, atol=1e-6, rtol=1e-5)
    assert (unique[0] - unique[1]).abs().max() > 0.1 * scale, "experts must get different unique parts"


def test_decoupled_model_satisfies_the_init_invariants_with_the_model_init_stds() -> None:
    model = _model()
    arch = model.config
    stds = {"gate": arch.init_std, "up": arch.init_std, "down": arch.init_std / math.sqrt(2 * arch.n_layers)}
    for bank in decoupled_banks(model):
        for matrix in MATRIX_TYPES:
            common, unique, left, right = bank.parts(matrix)
            assert (left.T @ unique).abs().max() < 1e-5 * unique.abs().max()
            assert (unique @ right).abs().max() < 1e-5 * unique.abs().max()
            assert torch.linalg.matrix_rank(common) == 4
            spectra = torch.linalg.svdvals(common + unique)
            torch.testing.assert_close(spectra, spectra[0].expand_as(spectra), atol=1e-6, rtol=1e-5)
            proxy_std = (common + unique).std().item()
            assert 0.9 * stds[matrix] < proxy_std < 1.1 * stds[matrix], (matrix, proxy_std)


def test_layers_and_matrix_types_get_different_common_parts() -> None:
    banks = decoupled_banks(_model())
    assert not torch.allclose(banks[0].parts("gate")[0], banks[1].parts("gate")[0])
    assert not torch.allclose(banks[0].parts("gate")[0], banks[0].parts("up")[0])


# --- gradient split (docs/design/sdmoe.md §4) ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_unique_projection_matches_the_materialised_projectors_and_is_idempotent(shape: tuple[int, int]) -> None:
    rows, cols = shape
    left, right = _orthonormal(rows, 4, 1), _orthonormal(cols, 4, 2)
    grad = torch.randn(5, rows, cols)
    projected = grad.clone()
    project_unique_gradient_(projected, left, right)

    torch.testing.assert_close(projected.double(), _complement_reference(grad, left, right), atol=1e-5, rtol=1e-5)
    assert (left.T @ projected).abs().max() < 1e-5
    assert (projected @ right).abs().max() < 1e-5
    twice = projected.clone()
    project_unique_gradient_(twice, left, right)
    torch.testing.assert_close(twice, projected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_common_and_unique_gradients_add_up_to_the_expert_summed_gradient(shape: tuple[int, int]) -> None:
    rows, cols = shape
    left, right = _orthonormal(rows, 4, 3), _orthonormal(cols, 4, 4)
    grad = torch.randn(5, rows, cols)
    unique, common = grad.clone(), grad.sum(0)
    project_unique_gradient_(unique, left, right)
    project_common_gradient_(common, left, right)

    torch.testing.assert_close(common + unique.sum(0), grad.sum(0), atol=1e-5, rtol=1e-5)
    summed = grad.sum(0)
    reference = left @ left.T @ summed + (torch.eye(rows) - left @ left.T) @ summed @ right @ right.T
    torch.testing.assert_close(common, reference, atol=1e-5, rtol=1e-5)
    again = common.clone()
    project_common_gradient_(again, left, right)
    torch.testing.assert_close(again, common, atol=1e-5, rtol=0)


def test_low_precision_gradients_are_projected_in_fp32_and_keep_their_dtype() -> None:
    left, right = _orthonormal(32, 4, 5), _orthonormal(16, 4, 6)
    grad = torch.randn(3, 32, 16, generator=torch.Generator().manual_seed(7)).bfloat16()
    projected = grad.clone()
    project_unique_gradient_(projected, left, right)
    assert projected.dtype == torch.bfloat16
    reference = _complement_reference(grad.float(), left, right)
    # Projected in fp32 and rounded once, every entry is within half a bf16 spacing of the fp32 result
    # (plus fp32 rounding slack). Projecting in bf16 cancels to errors of many spacings near zero, which
    # a 1e-2 tolerance let through.
    half_spacing = torch.exp2(torch.floor(torch.log2(reference.abs().clamp_min(1e-30))) - 8)
    error = (projected.float() - reference).abs()
    assert (error <= half_spacing + 1e-6).all(), (error / half_spacing).max()


def test_project_gradients_splits_every_decomposed_gradient_of_a_model() -> None:
    model = _model()
    _backward(model)
    raw = {
        (id(bank), matrix): [part.grad.clone() for part in bank.parts(matrix)[:2]]
        for bank in decoupled_banks(model)
        for matrix in MATRIX_TYPES
    }
    project_gradients(model)
    for bank in decoupled_banks(model):
        for matrix in MATRIX_TYPES:
            common, unique, left, right = bank.parts(matrix)
            raw_common, raw_unique = raw[id(bank), matrix]
            # autograd's W_c gradient is the sum of the per-expert proxy gradients (docs/design/sdmoe.md §4).
            torch.testing.assert_close(raw_common, raw_unique.sum(0), atol=1e-6, rtol=1e-5)
            assert (left.T @ unique.grad).abs().max() < 1e-5 * raw_unique.abs().max()
            assert (unique.grad @ right).abs().max() < 1e-5 * raw_unique.abs().max()
            torch.testing.assert_close(common.grad + unique.grad.sum(0), raw_common, atol=1e-6, rtol=1e-5)


def test_projection_hooks_give_the_gradients_of_backward_then_projection() -> None:
    # The DeepSpeed path projects each micro-batch's gradient inside backward; two micro-batches
    # accumulated through the hooks must equal the plain accumulated gradients projected once.
    hooked, plain = _model(), _model()
    plain.load_state_dict(hooked.state_dict())
    handles = register_gradient_projection_hooks(hooked)
    for seed in (0, 1):
        _backward(hooked, seed)
        _backward(plain, seed)
    project_gradients(plain)
    for (name, a), (_, b) in zip(hooked.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    bank = decoupled_banks(hooked)[0]
    _, unique, left, _ = bank.parts("gate")
    assert (left.T @ unique.grad).abs().max() < 1e-5 * unique.grad.abs().max()
    for handle in handles:
        handle.remove()


# --- strict mode -------------------------------------------------------------------------------------


def test_strict_update_projection_keeps_only_the_complement_part_of_any_update() -> None:
    left, right = _orthonormal(24, 4, 7), _orthonormal(40, 4, 8)
    before = torch.randn(3, 24, 40)  # deliberately not in the complement: only the update is projected
    update = torch.randn(3, 24, 40)
    reference = update_reference(before, left, right)
    after = before + update
    project_unique_update_(after, reference, left, right)
    torch.testing.assert_close(after - before, _complement_reference(update, left, right).float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strict", [True, False])
def test_strict_adamw_steps_keep_unique_parts_in_the_complement_of_the_bases_used(strict: bool) -> None:
    model = _model(strict=strict, refresh_every=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        optimizer.zero_grad()
        _backward(model, seed=step)
        project_gradients(model)
        reference = strict_update_reference(model)
        optimizer.step()
        finish_optimizer_step(model, reference)
    worst = 0.0
    for bank in decoupled_banks(model):
        for matrix in MATRIX_TYPES:
            _, unique, left, right = bank.parts(matrix)
            overlap = max((left.T @ unique).abs().max(), (unique @ right).abs().max()) / unique.abs().max()
            worst = max(worst, overlap.item())
    if strict:
        assert worst < 1e-5
    else:
        assert worst > 1e-3, "AdamW's elementwise scaling should leave the complement without strict mode"


# --- basis refresh (docs/design/sdmoe.md §5) -----------------------------------------------------------------------


def _with_gap(model: Transformer) -> None:
    """Give every W_c a random top-4 subspace with a clear spectral gap, away from its initial bases."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for bank in decoupled_banks(model):
            for matrix in MATRIX_TYPES:
                common = bank.parts(matrix)[0]
                rows, cols = common.shape
                left = torch.linalg.qr(torch.randn(rows, 4, generator=generator)).Q
                right = torch.linalg.qr(torch.randn(cols, 4, generator=generator)).Q
                noise = 0.01 * torch.randn(rows, cols, generator=generator)
                common.copy_(left @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ right.T + noise)


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_refresh_recomputes_the_bases_from_the_current_common_part_only(svd: str) -> None:
    model = _model(svd=svd)
    _with_gap(model)
    weights = {name: param.clone() for name, param in model.named_parameters()}
    refresh_bases(model)
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), f"refresh must not touch {name}"
    for bank in decoupled_banks(model):
        for matrix in MATRIX_TYPES:
            common, _, left, right = bank.parts(matrix)
            svd_left, _, svd_right_adjoint = torch.linalg.svd(common)
            expected_left, expected_right = svd_left[:, :4], svd_right_adjoint[:4].T
            torch.testing.assert_close(left @ left.T, expected_left @ expected_left.T, atol=1e-4, rtol=0)
            torch.testing.assert_close(right @ right.T, expected_right @ expected_right.T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_refresh_is_deterministic(svd: str) -> None:
    first, second = _model(svd=svd), _model(svd=svd)
    for global_seed, model in enumerate((first, second)):
        _with_gap(model)
        torch.manual_seed(global_seed)  # the global RNG must not matter
        refresh_bases(model)
    for (name, a), (_, b) in zip(first.named_buffers(), second.named_buffers(), strict=True):
        assert torch.equal(a, b), name


def test_each_lowrank_refresh_draws_a_fresh_sketch_per_layer_and_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    import sdmoe_train.moe.sdmoe as sdmoe_module

    seeds: list[int] = []

    def recording(matrix: Tensor, rank: int, method: str, generator: torch.Generator | None = None):
        seeds.append(generator.initial_seed())
        return top_singular_bases(matrix, rank, method, generator)

    monkeypatch.setattr(sdmoe_module, "top_singular_bases", recording)
    model = _model(svd="lowrank", refresh_every=1)
    banks = len(decoupled_banks(model))
    finish_optimizer_step(model, None)
    first = seeds[:]
    finish_optimizer_step(model, None)
    assert len(first) == banks * len(MATRIX_TYPES) == len(set(first)), "one sketch per layer and matrix"
    assert not set(first) & set(seeds[len(first) :]), "the second refresh reused a sketch of the first"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_folding_moves_the_touching_parts_of_the_unique_parts_into_the_common_part(shape: tuple[int, int]) -> None:
    rows, cols = shape
    left, right = _orthonormal(rows, 4, 3), _orthonormal(cols, 4, 4)
    generator = torch.Generator().manual_seed(5)
    shared = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    unique = shared + torch.randn(3, rows, cols, generator=generator, dtype=torch.float64)
    common = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    before_unique, before_common = unique.clone(), common.clone()
    fold_touching_parts_(common, unique, left, right)
    complement = _complement_reference(before_unique, left, right)
    torch.testing.assert_close(unique, complement, atol=1e-12, rtol=0)
    touching = before_unique - complement
    torch.testing.assert_close(common, before_common + touching.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close((common + unique).mean(0), (before_common + before_unique).mean(0), atol=1e-12, rtol=0)
    proxy_change = (common + unique) - (before_common + before_unique)
    torch.testing.assert_close(proxy_change, touching.mean(0) - touching, atol=1e-12, rtol=0)


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_refresh_with_reproject_unique_puts_unique_parts_back_in_the_new_complement(svd: str) -> None:
    model = _model(svd=svd, reproject_unique=True)
    _with_gap(model)
    before = {
        (id(bank), matrix): [part.detach().clone() for part in bank.parts(matrix)[:2]]
        for bank in decoupled_banks(model)
        for matrix in MATRIX_TYPES
    }
    refresh_bases(model)
    for bank in decoupled_banks(model):
        for matrix in MATRIX_TYPES:
            common, unique, left, right = bank.parts(matrix)
            old_common, old_unique = before[id(bank), matrix]
            assert (left.T @ old_unique).abs().max() > 1e-3 * old_unique.abs().max(), "the new bases must rotate"
            assert (left.T @ unique).abs().max() < 1e-5 * unique.abs().max()
            assert (unique @ right).abs().max() < 1e-5 * unique.abs().max()
            torch.testing.assert_close((common + unique).mean(0), (old_common + old_unique).mean(0), atol=1e-6, rtol=0)
            assert not torch.equal(common, old_common)


@pytest.mark.parametrize("svd", ["full", "lowrank"])
@pytest.mark.parametrize("bases_from", ["common", "experts"])
def test_refresh_takes_the_bases_from_the_configured_source(bases_from: str, svd: str) -> None:
    model = _model(bases_from=bases_from, svd=svd)
    _with_gap(model)
    generator = torch.Generator().manual_seed(12)
    planted = {}
    with torch.no_grad():
        for bank in decoupled_banks(model):
            for matrix in MATRIX_TYPES:
                # Every unique part reads and writes the same rank-4 subspaces, each with its own mixing, more
                # strongly than W_c: a shared subspace, not a shared matrix (the experts' mean stays small).
                unique = bank.parts(matrix)[1]
                num_experts, rows, cols = unique.shape
                left, right = _orthonormal(rows, 4, 21), _orthonormal(cols, 4, 22)
                mixing = 100 * torch.randn(num_experts, 4, 4, generator=generator)
                unique.copy_(left @ mixing @ right.T + 0.01 * torch.randn(unique.shape, generator=generator))
                planted[id(bank), matrix] = (left, right)
    refresh_bases(model)
    for bank in decoupled_banks(model):
        for matrix in MATRIX_TYPES:
            common, _, left, right = bank.parts(matrix)
            if bases_from == "common":
                svd_left, _, svd_right_adjoint = torch.linalg.svd(common.detach())
                expected_left, expected_right = svd_left[:, :4], svd_right_adjoint[:4].T
            else:
                expected_left, expected_right = planted[id(bank), matrix]
            torch.testing.assert_close(left @ left.T, expected_left @ expected_left.T, atol=1e-3, rtol=0)
            torch.testing.assert_close(right @ right.T, expected_right @ expected_right.T, atol=1e-3, rtol=0)


def test_training_steps_with_reproject_unique_fold_only_at_refresh_steps() -> None:
    model = _model(reproject_unique=True, refresh_every=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    bank = decoupled_banks(model)[0]

    def leakage() -> float:
        _, unique, left, right = (part.detach() for part in bank.parts("up"))
        return float(max((left.T @ unique).abs().max(), (unique @ right).abs().max()) / unique.abs().max())

    for step in range(1, 5):
        optimizer.zero_grad()
        _backward(model, seed=step)
        project_gradients(model)
        optimizer.step()
        refreshed = finish_optimizer_step(model, strict_update_reference(model))
        assert refreshed == (step % 2 == 0)
        # Non-strict AdamW steps leave the complement; a refresh step ends back inside it.
        assert (leakage() < 1e-5) == refreshed, (step, leakage())


def test_lowrank_bases_match_the_full_svd_on_a_large_matrix_with_a_gap() -> None:
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(300, 8, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(200, 8, generator=generator)).Q
    matrix = left @ torch.diag(torch.linspace(8, 1, 8)) @ right.T + 0.01 * torch.randn(300, 200, generator=generator)
    full = top_singular_bases(matrix, 8, "full")
    lowrank = top_singular_bases(matrix, 8, "lowrank", torch.Generator().manual_seed(1))
    for exact, approx in zip(full, lowrank, strict=True):
        torch.testing.assert_close(approx @ approx.T, exact @ exact.T, atol=1e-3, rtol=0)


def test_bases_refresh_exactly_every_refresh_every_optimizer_steps() -> None:
    model = _model(refresh_every=3)
    _with_gap(model)
    bank = decoupled_banks(model)[0]
    initial = bank.parts("gate")[2].clone()
    refreshed_at = [step for step in range(1, 7) if finish_optimizer_step(model, None)]
    assert refreshed_at == [3, 6]
    assert bank.steps == 6 and int(bank.optimizer_steps) == 6
    assert not torch.allclose(bank.parts("gate")[2], initial)


def test_step_counter_survives_a_state_dict_round_trip() -> None:
    saved = _model(refresh_every=4)
    for _ in range(3):
        finish_optimizer_step(saved, None)
    restored = _model(refresh_every=4, seed=5)
    assert decoupled_banks(restored)[0].steps == 0
    restored.load_state_dict(saved.state_dict())
    assert all(bank.steps == 3 for bank in decoupled_banks(restored))
    assert finish_optimizer_step(restored, None), "the 4th step of the saved run refreshes"
    assert all(bank.steps == 4 for bank in decoupled_banks(restored))


# --- forward, merge, configuration --------------------------------------------------------------------


def test_forward_uses_the_proxies_through_the_grouped_path() -> None:
    model = _model()
    bank = decoupled_banks(model)[0]
    x = torch.randn(12, model.config.hidden_dim)
    tokens_per_expert = torch.tensor([3, 0, 2, 1, 1, 2, 2, 1])
    plain = ExpertBank(bank.num_experts, model.config.hidden_dim, model.config.moe.expert_hidden_dim)
    with torch.no_grad():
        for matrix in MATRIX_TYPES:
            getattr(plain, f"{matrix}_proj").copy_(bank.proxy(matrix))
        torch.testing.assert_close(bank(x, tokens_per_expert), plain(x, tokens_per_expert), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("matrices", [["gate", "up", "down"], ["gate"], ["up", "down"], ["down"]])
def test_decoupled_bank_gradients_equal_a_per_expert_loop_for_every_part(matrices: list[str]) -> None:
    model = Transformer(_tiny_arch())
    apply_spectral_decoupling(model, SDMoEConfig(enabled=True, rank=4, matrices=matrices))
    bank = decoupled_banks(model)[0]
    x = torch.randn(12, model.config.hidden_dim)
    tokens_per_expert = torch.tensor([3, 0, 2, 1, 1, 2, 2, 1])
    grad_out = torch.randn(12, model.config.hidden_dim)

    def gradients(output: Tensor) -> dict[str, Tensor]:
        bank.zero_grad(set_to_none=True)
        output.backward(grad_out)
        return {name: p.grad.clone() for name, p in bank.named_parameters()}

    grouped = gradients(bank(x, tokens_per_expert))
    # Plain matmuls on each expert's slice of rows, through autograd's own W_c + W_u.
    rows = x.split(tokens_per_expert.tolist())
    looped = gradients(torch.cat([bank.run_expert(expert, rows[expert]) for expert in range(bank.num_experts)]))
    assert grouped.keys() == looped.keys() and any(name.endswith("_common") for name in grouped)
    for name, grad in looped.items():
        torch.testing.assert_close(grouped[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_merge_gives_plain_banks_with_the_vanilla_names_and_the_same_logits() -> None:
    model = _model()
    _with_gap(model)
    vanilla_names = [(name, p.shape) for name, p in Transformer(_tiny_arch()).named_parameters()]
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(tokens).logits
        merge_spectral_decoupling(model)
        after = model(tokens).logits
    assert not decoupled_banks(model)
    assert [(name, p.shape) for name, p in model.named_parameters()] == vanilla_names
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_only_the_listed_matrices_are_decomposed() -> None:
    model = Transformer(_tiny_arch())
    plain_down = [layer.experts.down_proj for _, layer in model.moe_layers()]
    apply_spectral_decoupling(model, SDMoEConfig(enabled=True, rank=4, matrices=["gate", "up"]))
    for bank, down in zip(decoupled_banks(model), plain_down, strict=True):
        assert bank.down_proj is down
        assert not hasattr(bank, "down_proj_common")
        assert isinstance(bank, DecoupledExpertBank)


def test_disabled_config_leaves_the_model_untouched() -> None:
    model = Transformer(_tiny_arch())
    before = [(name, p.clone()) for name, p in model.named_parameters()]
    apply_spectral_decoupling(model, SDMoEConfig(enabled=False))
    after = list(model.named_parameters())
    assert [name for name, _ in after] == [name for name, _ in before]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(after, before, strict=True))


@pytest.mark.parametrize(("rank", "limit"), [(48, 47), (200, 47)])
def test_rank_must_be_below_both_matrix_dimensions(rank: int, limit: int) -> None:
    with pytest.raises(ConfigError, match=rf"sdmoe.rank={rank} must be smaller .* sdmoe.rank <= {limit}"):
        apply_spectral_decoupling(Transformer(_tiny_arch()), SDMoEConfig(enabled=True, rank=rank))


def test_sdmoe_on_a_dense_model_is_a_config_error() -> None:
    arch = _tiny_arch()
    arch.moe = None
    with pytest.raises(ConfigError, match="sdmoe.enabled=true needs an MoE model"):
        apply_spectral_decoupling(Transformer(arch), SDMoEConfig(enabled=True))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank": 0}, "sdmoe.rank=0 must be >= 1"),
        ({"refresh_every": 0}, "sdmoe.refresh_every=0 must be >= 1"),
        ({"matrices": []}, r"sdmoe.matrices=\[\] must name"),
        ({"matrices": ["up", "up"]}, "at most once"),
        ({"matrices": ["gate", "ffn"]}, r"contains \['ffn'\]"),
        ({"svd": "exact"}, "sdmoe.svd='exact' must be 'full' or 'lowrank'"),
        ({"bases_from": "proxy"}, "sdmoe.bases_from='proxy' must be 'common' or 'experts'"),
    ],
)
def test_invalid_sdmoe_config_names_field_and_value(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SDMoEConfig(**fields)
