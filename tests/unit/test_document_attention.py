"""Document-aware attention: boundaries from EOS, the packed and flex kernels against a dense-mask
reference, and the model-level identity: a packed sequence with masking and restarted positions has
exactly the losses and gradients of its documents run separately."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sdmoe_train.models import document_attention
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.document_attention import DocumentMask, document_ids, positions_in_documents
from sdmoe_train.models.transformer import Transformer

EOS = 0


def _reference(q: Tensor, k: Tensor, v: Tensor, ids_BS: Tensor, scale: float | None = None) -> Tensor:
    """Dense block-diagonal causal mask through SDPA's math path."""
    index = torch.arange(ids_BS.shape[1])
    mask = (ids_BS[:, None, :, None] == ids_BS[:, None, None, :]) & (index[:, None] >= index[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _tokens(layout: list[list[int]], seq_len: int) -> Tensor:
    """Rows of random non-EOS tokens with EOS at the given positions."""
    tokens = torch.randint(1, 50, (len(layout), seq_len))
    for row, positions in enumerate(layout):
        tokens[row, positions] = EOS
    return tokens


def test_document_ids_count_the_eos_before_each_token_and_positions_restart_after_it() -> None:
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    ids = document_ids(tokens, EOS)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert positions_in_documents(ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert positions_in_documents(document_ids(torch.tensor([[1, 2, 3]]), EOS)).tolist() == [[0, 1, 2]]


LAYOUTS = {
    "short_documents": [[3, 4, 40, 41, 150], [199], [0, 63, 64, 127, 128, 191]],
    "no_boundary_in_one_row": [[], [90], [10, 20, 30]],
    "single_documents_only": [[], [], [199]],
    "many_tiny_documents": [list(range(0, 200, 3)), list(range(1, 200, 7)), [100]],
}


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize(
    ("heads", "kv_heads", "qk_dim", "v_dim", "scale"),
    [(4, 2, 16, 16, None), (4, 4, 24, 16, 0.3)],
    ids=["gqa", "mla_shapes"],
)
def test_packed_kernel_equals_the_dense_mask_in_values_and_gradients(
    layout: list[list[int]], heads: int, kv_heads: int, qk_dim: int, v_dim: int, scale: float | None
) -> None:
    ids = document_ids(_tokens(layout, 200), EOS)
    q = torch.randn(3, heads, 200, qk_dim, requires_grad=True)
    k = torch.randn(3, kv_heads, 200, qk_dim, requires_grad=True)
    v = torch.randn(3, kv_heads, 200, v_dim, requires_grad=True)
    expected = _reference(q, k, v, ids, scale)
    actual = DocumentMask(ids, "packed").attend(q, k, v, scale)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    for got, want in zip(
        torch.autograd.grad(actual, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_packed_kernel_pads_documents_to_the_granule_and_groups_equal_lengths() -> None:
    granule = document_attention.PACKED_LENGTH_GRANULE
    # Documents of granule - 1, granule + 2, 1 and 2 * granule - 1 tokens.
    ends = [granule - 2, 2 * granule - 1, 2 * granule]
    layout = document_attention._packed_layout(document_ids(_tokens([ends], 4 * granule), EOS))
    assert layout is not None
    assert layout.rows == ((2, granule), (2, 2 * granule))
    assert document_attention._packed_layout(document_ids(_tokens([[]], 64), EOS)) is None


def test_flex_kernel_forward_equals_the_dense_mask() -> None:
    # PyTorch 2.13 has no FlexAttention backward on CPU; its forward checks the block mask here.
    ids = document_ids(_tokens(LAYOUTS["short_documents"], 200), EOS)
    q, k, v = torch.randn(3, 4, 200, 16), torch.randn(3, 2, 200, 16), torch.randn(3, 2, 200, 8)
    torch.testing.assert_close(
        DocumentMask(ids, "flex").attend(q, k, v), _reference(q, k, v, ids), atol=1e-5, rtol=1e-5
    )


def test_auto_kernel_is_packed_off_cuda() -> None:
    assert DocumentMask(torch.zeros(1, 8, dtype=torch.int32)).kernel == "packed"


def _summed_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "cross_document"])
def test_packed_loss_and_gradients_equal_the_documents_run_separately(
    tiny_config: TransformerConfig, masked: bool
) -> None:
    """Both model families (GQA and MLA): with masking and restarted positions, a packed sequence is
    exactly its documents one by one; attending across documents it is not."""
    model = Transformer(tiny_config)
    lengths = [7, 12, 9, 20]  # the last document goes on past the end of the sequence (no EOS)
    documents = [torch.randint(1, tiny_config.vocab_size, (length,)) for length in lengths]
    for document in documents[:-1]:
        document[-1] = EOS
    packed = torch.cat(documents)
    inputs, targets = packed[None, :-1], packed[None, 1:]

    ids = document_ids(inputs, EOS)
    extra = {"document_ids_BS": ids, "positions_BS": positions_in_documents(ids)} if masked else {}
    packed_loss = _summed_loss(model(inputs, **extra).logits, targets)
    packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()), allow_unused=True)

    separate_loss = torch.zeros(())
    start = 0
    for length in lengths:
        end = min(start + length, inputs.shape[1])
        separate_loss = separate_loss + _summed_loss(model(inputs[:, start:end]).logits, targets[:, start:end])
        start = end
    separate_grads = torch.autograd.grad(separate_loss, list(model.parameters()), allow_unused=True)

    if not masked:
        assert not torch.isclose(packed_loss, separate_loss, rtol=1e-4), (packed_loss, separate_loss)
        return
    torch.testing.assert_close(packed_loss, separate_loss, rtol=1e-5, atol=1e-4)
    for packed_grad, separate_grad in zip(packed_grads, separate_grads, strict=True):
        if packed_grad is None:
            assert separate_grad is None
        else:
            torch.testing.assert_close(packed_grad, separate_grad, rtol=1e-4, atol=1e-5)


def test_masking_without_restarted_positions_gives_the_same_logits_up_to_rounding(
    tiny_config: TransformerConfig,
) -> None:
    # RoPE scores depend on relative positions only, so restarting them inside a masked document
    # changes nothing but rounding.
    model = Transformer(tiny_config).eval()
    tokens = _tokens([[5, 20, 33]], 48) % tiny_config.vocab_size
    ids = document_ids(tokens, EOS)
    with torch.no_grad():
        restarted = model(tokens, document_ids_BS=ids, positions_BS=positions_in_documents(ids)).logits
        continued = model(tokens, document_ids_BS=ids).logits
        unmasked = model(tokens).logits
    torch.testing.assert_close(continued, restarted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmasked[:, 6:], restarted[:, 6:], atol=1e-3)
    torch.testing.assert_close(unmasked[:, :6], restarted[:, :6])


def test_activation_checkpointing_passes_the_mask_to_every_block(tiny_config: TransformerConfig) -> None:
    model = Transformer(tiny_config)
    tokens = _tokens([[5, 20, 33]], 48) % tiny_config.vocab_size
    ids = document_ids(tokens, EOS)
    plain = model(tokens, document_ids_BS=ids).logits
    model.activation_checkpointing = True
    checkpointed = model(tokens, document_ids_BS=ids).logits
    torch.testing.assert_close(checkpointed, plain)


@pytest.mark.parametrize(("cross_document", "restart"), [(False, True), (False, False), (True, True), (True, False)])
def test_pretrain_module_follows_the_data_modules_document_settings(
    tiny_config: TransformerConfig, cross_document: bool, restart: bool
) -> None:
    from types import SimpleNamespace

    from sdmoe_train.lightning.module import PretrainModule

    module = PretrainModule(tiny_config)
    module.configure_model()
    data = SimpleNamespace(
        vocab_size=tiny_config.vocab_size,
        cross_document_attention=cross_document,
        restart_positions=restart,
        eos_token_id=EOS,
        validation_sources=None,
    )
    module._trainer = SimpleNamespace(datamodule=data)
    module.setup("fit")
    tokens = _tokens([[5, 20, 33]], 48) % tiny_config.vocab_size
    ids = document_ids(tokens, EOS)
    expected = module.model(
        tokens,
        document_ids_BS=None if cross_document else ids,
        positions_BS=positions_in_documents(ids) if restart else None,
    ).logits
    torch.testing.assert_close(module(tokens), expected, rtol=0, atol=0)
