"""Sort-based dispatch (LocalDispatcher + grouped-GEMM ExpertBank) against the naive per-expert reference."""

# Shape key: B sequences, S tokens per sequence, T tokens, D model width, E experts, K experts per token,
# N token copies sent to experts, F expert width.

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from sdmoe_train.moe import experts as experts_module
from sdmoe_train.moe.config import MoEConfig
from sdmoe_train.moe.dispatch import LocalDispatcher, bin_counts, expert_capacity
from sdmoe_train.moe.experts import ExpertBank, grouped_linear, reference_moe_forward
from sdmoe_train.moe.layer import MoELayer

HIDDEN_DIM = 8  # CPU grouped_mm needs 16-byte aligned rows: a multiple of 4 fp32 values.

QWEN_STYLE = dict(
    num_experts=4,
    top_k=2,
    expert_hidden_dim=8,
    num_shared_experts=1,
    shared_expert_gate=True,
    score_fn="softmax",
)
DEEPSEEK_STYLE = dict(
    num_experts=8,
    top_k=3,
    expert_hidden_dim=8,
    num_shared_experts=2,
    score_fn="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    n_group=4,
    topk_group=2,
    group_score_fn="top2_sum",
)
DEEPSEEK_SELECTION_BIAS_E = torch.tensor([0.2, -0.1, 0.0, 0.3, -0.2, 0.1, 0.05, -0.3])

# Tolerances per path. The float64 run goes through the per-expert loop (CPU grouped_mm has no float64
# kernel); the router always computes in fp32, so the router weight and the input (which also feeds the
# router) only agree to fp32 rounding there, while everything downstream of the routing agrees to ~1e-12.
TOLERANCES = {
    torch.float32: {"tight": dict(rtol=1e-4, atol=1e-5), "router": dict(rtol=1e-4, atol=1e-5)},
    torch.float64: {"tight": dict(rtol=1e-10, atol=1e-12), "router": dict(rtol=1e-6, atol=1e-8)},
}


def _build_layer(dtype: torch.dtype, **moe_kwargs) -> MoELayer:
    layer = MoELayer(HIDDEN_DIM, MoEConfig(**moe_kwargs))
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(std=0.5)
    layer = layer.to(dtype)
    if moe_kwargs.get("score_fn") == "sigmoid":
        layer.router.selection_bias.copy_(DEEPSEEK_SELECTION_BIAS_E.to(layer.router.selection_bias.dtype))
    return layer


def _reference_output(layer: MoELayer, inputs: Tensor) -> Tensor:
    """Naive routed experts plus the shared SwiGLU and its sigmoid gate written out by hand."""
    cfg = layer.config
    x_TD = inputs.reshape(-1, inputs.shape[-1])
    routing = layer.router(x_TD)
    capacity = expert_capacity(x_TD.shape[0], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
    y_TD = reference_moe_forward(x_TD, routing.expert_ids_TK, routing.weights_TK, layer.experts, capacity)
    if layer.shared_experts is not None:
        shared = layer.shared_experts
        hidden_TF = F.silu(x_TD @ shared.gate_proj.weight.T) * (x_TD @ shared.up_proj.weight.T)
        shared_TD = hidden_TF @ shared.down_proj.weight.T
        if layer.shared_expert_gate is not None:
            shared_TD = torch.sigmoid(x_TD @ layer.shared_expert_gate.weight.T) * shared_TD
        y_TD = y_TD + shared_TD
    return y_TD.view_as(inputs)


def _gradients(layer: MoELayer, inputs: Tensor, outputs: Tensor, grad_outputs: Tensor) -> dict[str, Tensor]:
    names, params = zip(*layer.named_parameters(), strict=True)
    grads = torch.autograd.grad(outputs, (inputs, *params), grad_outputs)
    return dict(zip(("input", *names), grads, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-grouped_mm", "fp64-loop"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0], ids=["dropless", "cap0.5", "cap1.0"])
@pytest.mark.parametrize("with_shared", [True, False], ids=["shared", "no_shared"])
@pytest.mark.parametrize("family", [QWEN_STYLE, DEEPSEEK_STYLE], ids=["softmax", "sigmoid"])
def test_moe_layer_matches_reference_in_output_and_every_gradient(
    family: dict, with_shared: bool, capacity_factor: float | None, dtype: torch.dtype, monkeypatch
) -> None:
    if dtype == torch.float64:
        monkeypatch.setattr(experts_module, "_has_grouped_mm_kernel", lambda x, w: False)
    moe_kwargs = dict(family, capacity_factor=capacity_factor)
    if not with_shared:
        moe_kwargs.update(num_shared_experts=0, shared_expert_gate=False)
    layer = _build_layer(dtype, **moe_kwargs)
    x_BSD = torch.randn(2, 8, HIDDEN_DIM, dtype=dtype, requires_grad=True)
    grad_BSD = torch.randn(2, 8, HIDDEN_DIM, dtype=dtype)

    y_BSD, stats = layer(x_BSD)
    y_ref_BSD = _reference_output(layer, x_BSD)
    grads = _gradients(layer, x_BSD, y_BSD, grad_BSD)
    grads_ref = _gradients(layer, x_BSD, y_ref_BSD, grad_BSD)

    tol = TOLERANCES[dtype]
    assert y_BSD.dtype == dtype
    torch.testing.assert_close(y_BSD, y_ref_BSD, **tol["tight"])
    expected_names = {"input", "router.weight", "experts.gate_proj", "experts.up_proj", "experts.down_proj"}
    if with_shared:
        expected_names |= {f"shared_experts.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
    if with_shared and family is QWEN_STYLE:
        expected_names.add("shared_expert_gate.weight")
    assert set(grads) == expected_names
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name} received no gradient"
        kind = "router" if name in ("input", "router.weight") else "tight"
        torch.testing.assert_close(grad, grads_ref[name], **tol[kind], msg=lambda m, n=name: f"{n}: {m}")
    if capacity_factor is None:
        assert stats.dropped_fraction.item() == 0.0
    else:
        assert stats.dropped_fraction.item() > 0.0, "the capacity limit should drop some copies here"


def test_sigmoid_layer_selection_bias_changes_routing_in_the_parity_setup() -> None:
    # Guards the parity test: the nonzero selection bias must actually change some selections there.
    layer = _build_layer(torch.float32, **DEEPSEEK_STYLE)
    x_TD = torch.randn(16, HIDDEN_DIM)
    with torch.no_grad():
        biased_ids_TK = layer.router(x_TD).expert_ids_TK.sort(dim=-1).values
        layer.router.selection_bias.zero_()
        unbiased_ids_TK = layer.router(x_TD).expert_ids_TK.sort(dim=-1).values
    assert not torch.equal(biased_ids_TK, unbiased_ids_TK)


def test_grouped_linear_loop_path_equals_grouped_mm_path_with_empty_experts(monkeypatch) -> None:
    x_ND = torch.randn(7, 8, requires_grad=True)
    weight_EOI = torch.randn(4, 12, 8, requires_grad=True)
    tokens_per_expert_E = torch.tensor([3, 0, 4, 0])  # experts 1 and 3 (the last) receive no tokens
    grad_NO = torch.randn(7, 12)

    fast_NO = grouped_linear(x_ND, weight_EOI, tokens_per_expert_E)
    fast_grads = torch.autograd.grad(fast_NO, (x_ND, weight_EOI), grad_NO)

    def _forbidden(*args, **kwargs):
        raise AssertionError("the loop path must not call grouped_mm")

    monkeypatch.setattr(experts_module, "_has_grouped_mm_kernel", lambda x, w: False)
    monkeypatch.setattr(experts_module.F, "grouped_mm", _forbidden)
    loop_NO = grouped_linear(x_ND, weight_EOI, tokens_per_expert_E)
    loop_grads = torch.autograd.grad(loop_NO, (x_ND, weight_EOI), grad_NO)

    expected_NO = torch.cat([x_ND[:3] @ weight_EOI[0].T, x_ND[3:] @ weight_EOI[2].T])
    torch.testing.assert_close(fast_NO, expected_NO, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loop_NO, expected_NO, rtol=1e-5, atol=1e-6)
    for fast_grad, loop_grad in zip(fast_grads, loop_grads, strict=True):
        torch.testing.assert_close(fast_grad, loop_grad, rtol=1e-5, atol=1e-6)
    grad_weight_EOI = fast_grads[1]
    assert torch.equal(grad_weight_EOI[1], torch.zeros(12, 8))
    assert torch.equal(grad_weight_EOI[3], torch.zeros(12, 8))
    assert torch.equal(loop_grads[1][1], torch.zeros(12, 8))


# Hand-built routing for 5 tokens, top-2 of 3 experts.
# expert 0 <- tokens 0, 1, 2, 3, 4   expert 1 <- tokens 0, 2, 3   expert 2 <- tokens 1, 4
HAND_EXPERT_IDS_TK = torch.tensor([[0, 1], [2, 0], [0, 1], [1, 0], [0, 2]])


def _token_index_features(num_tokens: int, hidden_dim: int = 4) -> Tensor:
    """x_TD whose every feature equals the token's index, so dispatched rows reveal their token."""
    return torch.arange(num_tokens, dtype=torch.float32).unsqueeze(-1).repeat(1, hidden_dim)


def test_dispatch_groups_copies_by_expert_in_token_order_when_dropless() -> None:
    x_TD = _token_index_features(5)
    batch = LocalDispatcher(num_experts=3).dispatch(x_TD, HAND_EXPERT_IDS_TK, torch.ones(5, 2))
    assert batch.tokens_per_expert_E.tolist() == [5, 3, 2]
    assert batch.x_ND[:, 0].tolist() == [0, 1, 2, 3, 4, 0, 2, 3, 1, 4]
    assert torch.equal(batch.x_ND, batch.x_ND[:, :1].expand(-1, 4))


def test_dispatch_keeps_each_experts_first_copies_in_token_order_at_capacity() -> None:
    x_TD = _token_index_features(5)
    # capacity = ceil(0.75 * 5 tokens * 2 / 3 experts) = ceil(2.5) = 3
    assert expert_capacity(5, 2, 3, 0.75) == 3
    batch = LocalDispatcher(num_experts=3, capacity_factor=0.75).dispatch(x_TD, HAND_EXPERT_IDS_TK, torch.ones(5, 2))
    assert batch.tokens_per_expert_E.tolist() == [3, 3, 2]
    assert batch.x_ND[:, 0].tolist() == [0, 1, 2, 0, 2, 3, 1, 4]


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 1.5])
def test_tokens_per_expert_sums_to_kept_copies(capacity_factor: float | None) -> None:
    num_tokens, top_k, num_experts = 40, 3, 6
    expert_ids_TK = torch.rand(num_tokens, num_experts).topk(top_k, dim=-1).indices
    x_TD = _token_index_features(num_tokens)
    batch = LocalDispatcher(num_experts, capacity_factor).dispatch(x_TD, expert_ids_TK, torch.ones(num_tokens, top_k))

    counts_E = torch.bincount(expert_ids_TK.flatten(), minlength=num_experts)
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    kept_E = counts_E if capacity is None else counts_E.clamp(max=capacity)
    assert torch.equal(batch.tokens_per_expert_E, kept_E)
    assert batch.tokens_per_expert_E.sum().item() == batch.x_ND.shape[0]
    if capacity_factor == 0.5:
        assert batch.x_ND.shape[0] < num_tokens * top_k


def test_dispatch_preserves_token_order_inside_every_expert() -> None:
    num_tokens, top_k, num_experts = 64, 4, 8
    expert_ids_TK = torch.rand(num_tokens, num_experts).topk(top_k, dim=-1).indices
    batch = LocalDispatcher(num_experts).dispatch(
        _token_index_features(num_tokens), expert_ids_TK, torch.ones(num_tokens, top_k)
    )
    slices = batch.x_ND[:, 0].split(batch.tokens_per_expert_E.tolist())
    for expert, token_index_R in enumerate(slices):
        expected_R = torch.nonzero((expert_ids_TK == expert).any(dim=-1)).flatten().float()
        assert torch.equal(token_index_R, expected_R), f"expert {expert}"


def test_combine_of_dispatch_with_identity_experts_and_unit_weights_gives_k_times_input() -> None:
    num_tokens, top_k, num_experts = 10, 3, 5
    x_TD = torch.randn(num_tokens, 6)
    expert_ids_TK = torch.rand(num_tokens, num_experts).topk(top_k, dim=-1).indices
    dispatcher = LocalDispatcher(num_experts)
    batch = dispatcher.dispatch(x_TD, expert_ids_TK, torch.ones(num_tokens, top_k))
    y_TD = dispatcher.combine(batch.x_ND, batch)
    torch.testing.assert_close(y_TD, top_k * x_TD)


def test_dispatch_carries_the_routing_weight_of_each_kept_copy() -> None:
    weights_TK = torch.tensor([[0.5, 0.25], [2.0, 1.0], [1.0, 3.0], [0.125, 0.75], [4.0, 0.5]])
    batch = LocalDispatcher(num_experts=3, capacity_factor=0.75).dispatch(
        _token_index_features(5), HAND_EXPERT_IDS_TK, weights_TK
    )
    # expert 0 keeps tokens 0, 1, 2; expert 1 tokens 0, 2, 3; expert 2 tokens 1, 4.
    assert batch.weights_N.tolist() == [0.5, 1.0, 1.0, 0.25, 3.0, 0.125, 2.0, 0.5]


def test_combine_sums_each_tokens_kept_copies_and_skips_dropped_ones() -> None:
    x_TD = _token_index_features(5) + 1.0
    dispatcher = LocalDispatcher(num_experts=3, capacity_factor=0.75)  # capacity 3
    batch = dispatcher.dispatch(x_TD, HAND_EXPERT_IDS_TK, torch.ones(5, 2))
    y_TD = dispatcher.combine(batch.x_ND, batch)
    # Expert 0 drops the copies of tokens 3 and 4, so those tokens come back once, the others twice.
    kept_copies_T = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0])
    torch.testing.assert_close(y_TD, x_TD * kept_copies_T.unsqueeze(-1))


@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
def test_expert_bank_scales_each_rows_output_by_its_routing_weight(path: str, monkeypatch) -> None:
    if path == "loop":
        monkeypatch.setattr(experts_module, "_has_grouped_mm_kernel", lambda x, w: False)
    layer = _build_layer(torch.float32, **QWEN_STYLE)
    x_ND = torch.randn(9, HIDDEN_DIM)
    tokens_per_expert_E = torch.tensor([4, 0, 2, 3])
    weights_N = torch.rand(9) + 0.5
    weighted_ND = layer.experts(x_ND, tokens_per_expert_E, weights_N)
    unweighted_ND = layer.experts(x_ND, tokens_per_expert_E)
    expected_ND = torch.cat(
        [
            layer.experts.run_expert(0, x_ND[:4]),
            layer.experts.run_expert(2, x_ND[4:6]),
            layer.experts.run_expert(3, x_ND[6:]),
        ]
    )
    torch.testing.assert_close(unweighted_ND, expected_ND, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weighted_ND, weights_N.unsqueeze(-1) * expected_ND, rtol=1e-5, atol=1e-5)


class _RecordOutputShapes(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, Tensor)]
        return out


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_dispatch_and_combine_never_build_a_token_by_expert_tensor(capacity_factor: float | None) -> None:
    num_tokens, top_k, num_experts, hidden_dim = 7, 2, 5, 3
    x_TD = torch.randn(num_tokens, hidden_dim)
    expert_ids_TK = torch.rand(num_tokens, num_experts).topk(top_k, dim=-1).indices
    dispatcher = LocalDispatcher(num_experts, capacity_factor)
    with _RecordOutputShapes() as recorder:
        batch = dispatcher.dispatch(x_TD, expert_ids_TK, torch.ones(num_tokens, top_k))
        dispatcher.combine(batch.x_ND, batch)
    assert batch.x_ND.shape in recorder.shapes  # the recorder does see the dispatch ops
    dense_shapes = [shape for shape in recorder.shapes if len(shape) >= 2 and num_experts in shape]
    assert dense_shapes == []
    with _RecordOutputShapes() as control:  # the same criterion does flag a one-hot
        F.one_hot(expert_ids_TK, num_experts)
    assert [shape for shape in control.shapes if len(shape) >= 2 and num_experts in shape] == [(7, 2, 5)]


@pytest.mark.parametrize(
    ("dtype", "hidden_dim", "expert_hidden_dim", "expected"),
    [
        (torch.float32, 8, 8, True),
        (torch.float64, 8, 8, False),
        (torch.float32, 6, 8, False),
        (torch.float32, 8, 6, False),
        (torch.bfloat16, 16, 8, True),
        (torch.bfloat16, 12, 8, False),
    ],
)
def test_grouped_mm_is_used_only_for_dtypes_and_widths_its_cpu_kernel_accepts(
    dtype: torch.dtype, hidden_dim: int, expert_hidden_dim: int, expected: bool
) -> None:
    x_nd = torch.randn(5, hidden_dim, dtype=dtype)
    weight_eoi = torch.randn(3, expert_hidden_dim, hidden_dim, dtype=dtype)
    assert experts_module._has_grouped_mm_kernel(x_nd, weight_eoi) is expected
    out = grouped_linear(x_nd, weight_eoi, torch.tensor([2, 0, 3]))
    reference = torch.cat([x_nd[:2] @ weight_eoi[0].T, x_nd[2:] @ weight_eoi[2].T])
    torch.testing.assert_close(out, reference)  # dtype-default tolerances: one rounding of the result


def test_expert_bank_backward_accepts_an_expanded_output_gradient() -> None:
    bank = ExpertBank(num_experts=4, hidden_dim=8, expert_hidden_dim=8)
    for param in bank.parameters():
        torch.nn.init.normal_(param)
    x_nd = torch.randn(6, 8, requires_grad=True)
    bank(x_nd, torch.tensor([1, 2, 0, 3])).sum().backward()
    assert x_nd.grad is not None and bank.down_proj.grad.abs().sum() > 0


def test_bin_counts_equal_bincount_with_a_length_that_does_not_depend_on_the_data() -> None:
    ids_TK = torch.tensor([[0, 3], [3, 1], [0, 3]])
    assert torch.equal(bin_counts(ids_TK, 6), torch.bincount(ids_TK.flatten(), minlength=6))
    assert bin_counts(torch.zeros(0, 2, dtype=torch.int64), 6).tolist() == [0] * 6


def test_expert_gemms_run_in_the_autocast_dtype_on_fp32_inputs_and_weights() -> None:
    """Under bf16-mixed the experts see the fp32 RMSNorm output and fp32 master weights, like the dense layers."""
    torch.manual_seed(0)
    x_nd, weight_eoi = torch.randn(6, 16), torch.randn(3, 8, 16, requires_grad=True)
    tokens_per_expert = torch.tensor([2, 1, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_linear(x_nd, weight_eoi, tokens_per_expert)
        reference = torch.cat([rows @ w.T for rows, w in zip(x_nd.split([2, 1, 3]), weight_eoi, strict=True)])
    assert out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference)
    out.float().sum().backward()
    assert weight_eoi.grad is not None and weight_eoi.grad.dtype == torch.float32
