"""Incremental decoding with a key/value cache reproduces full forward passes: every step's logits to fp32
rounding and greedy decoding token for token, for GQA and MLA attention and every kind of MoE layer; a batch of
left-padded prompts of different lengths decodes as each prompt alone; training never touches a cache."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.kv_cache import KVCache
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import SDMoEConfig, apply_spectral_decoupling
from sdmoe_train.moe.ssmoe_router import SpectralRouter, SSMoEConfig, apply_spectral_routing

VOCAB = 256
TOLERANCE = 1e-5
"""Largest allowed difference of a logit between cached decoding and a full forward pass (fp32, logits of O(1))."""


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny tensors: a second intra-op thread only adds contention on a loaded machine."""
    torch.set_num_threads(1)


def _config(preset: str) -> TransformerConfig:
    config = presets.PRESETS[preset]()
    config.n_layers, config.vocab_size, config.max_seq_len = 2, VOCAB, 48
    # Wider logits than the default init: greedy choices far from ties, so rounding cannot flip one.
    config.init_std = 0.1
    return config


def _with_random_selection_bias(model: Transformer) -> Transformer:
    for _, layer in model.moe_layers():
        layer.router.selection_bias.copy_(torch.randn_like(layer.router.selection_bias) * 0.05)
    return model


def _qwen() -> Transformer:
    """GQA (2 key/value heads for 4 query heads, q/k/v bias), softmax top-2, a gated shared expert."""
    return Transformer(_config("tiny_qwen_moe"))


def _qwen3_qk_norm() -> Transformer:
    config = _config("tiny_qwen_moe")
    config.attention.qk_norm = True
    return Transformer(config)


def _deepseek() -> Transformer:
    """MLA, a dense first block, sigmoid group-limited routing (2 of 4 groups) with a selection bias, 2 shared."""
    return _with_random_selection_bias(Transformer(_config("tiny_deepseek_moe")))


def _sdmoe() -> Transformer:
    model = Transformer(_config("tiny_qwen_moe"))
    apply_spectral_decoupling(model, SDMoEConfig(enabled=True, rank=4))
    return model


def _ssmoe() -> Transformer:
    model = _with_random_selection_bias(Transformer(_config("tiny_deepseek_moe")))
    apply_spectral_routing(model, SSMoEConfig(enabled=True, c=0.5, k=4))
    return model


MODELS: dict[str, Callable[[], Transformer]] = {
    "qwen_gqa": _qwen,
    "qwen3_qk_norm": _qwen3_qk_norm,
    "deepseek_mla_group_limited": _deepseek,
    "sdmoe": _sdmoe,
    "ssmoe": _ssmoe,
}


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest) -> Transformer:
    built = MODELS[request.param]().eval()
    if request.param == "ssmoe":
        assert all(isinstance(layer.router, SpectralRouter) for _, layer in built.moe_layers())
    return built


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _full_forward_greedy(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and each step's (V,) logits, running the whole sequence through the model every step."""
    tokens, logits = list(prompt), []
    for _ in range(steps):
        logits.append(model(torch.tensor([tokens])).logits[0, -1])
        tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt) :], torch.stack(logits)


@torch.no_grad()
def _cached_greedy(model: Transformer, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of each prompt and the (B, steps, V) logits, decoding all prompts together, left-padded."""
    width = max(map(len, prompts))
    tokens_BS = torch.zeros(len(prompts), width, dtype=torch.long)
    valid_BS = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens_BS[row, width - len(prompt) :] = torch.tensor(prompt)
        valid_BS[row, width - len(prompt) :] = True
    cache = model.new_cache(len(prompts), width + steps)
    hidden_BSD = model.decode(tokens_BS, cache, valid_BS)
    chosen, logits = [], []
    for _ in range(steps):
        logits.append(model.lm_head(hidden_BSD[:, -1]))
        chosen.append(logits[-1].argmax(dim=-1))
        hidden_BSD = model.decode(chosen[-1][:, None], cache)
    return torch.stack(chosen, dim=1).tolist(), torch.stack(logits, dim=1)


def test_cached_decoding_reproduces_full_forward_passes(model: Transformer) -> None:
    prompt = _prompt(9, seed=1)
    expected_tokens, expected_logits = _full_forward_greedy(model, prompt, steps=12)
    (tokens,), logits = _cached_greedy(model, [prompt], steps=12)
    assert tokens == expected_tokens
    torch.testing.assert_close(logits[0], expected_logits, rtol=0, atol=TOLERANCE)


def test_the_prompts_hidden_states_equal_a_full_forward_pass(model: Transformer) -> None:
    tokens_BS = torch.tensor([_prompt(17, seed=2), _prompt(17, seed=3)])
    with torch.no_grad():
        expected_BSD, _ = model.hidden_states(tokens_BS)
        first = model.decode(tokens_BS[:, :5], cache := model.new_cache(2))
        rest = [model.decode(tokens_BS[:, start : start + 4], cache) for start in range(5, 17, 4)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), expected_BSD, rtol=0, atol=TOLERANCE)
    assert cache.length == 17


def test_left_padded_prompts_of_different_lengths_decode_as_each_alone(model: Transformer) -> None:
    prompts = [_prompt(length, seed=length) for length in (13, 4, 9, 1)]
    together_tokens, together_logits = _cached_greedy(model, prompts, steps=8)
    for row, prompt in enumerate(prompts):
        (alone_tokens,), alone_logits = _cached_greedy(model, [prompt], steps=8)
        assert together_tokens[row] == alone_tokens
        torch.testing.assert_close(together_logits[row], alone_logits[0], rtol=0, atol=TOLERANCE)
        assert alone_tokens == _full_forward_greedy(model, prompt, steps=8)[0]


def test_dropping_finished_rows_leaves_the_others_unchanged(model: Transformer) -> None:
    prompts = [_prompt(length, seed=10 + length) for length in (6, 11, 3)]
    expected = [_full_forward_greedy(model, prompt, steps=5)[0] for prompt in prompts]
    width = max(map(len, prompts))
    tokens_BS = torch.stack([torch.tensor([0] * (width - len(p)) + p) for p in prompts])
    valid_BS = torch.stack([torch.arange(width) >= width - len(p) for p in prompts])
    with torch.no_grad():
        cache = model.new_cache(3, width + 5)
        next_B = model.lm_head(model.decode(tokens_BS, cache, valid_BS)[:, -1]).argmax(-1)
        chosen = [[token] for token in next_B.tolist()]
        cache.keep_rows(torch.tensor([2, 0]))  # row 1 finished; the kept rows also change order
        for _ in range(4):
            next_B = model.lm_head(model.decode(torch.tensor([[chosen[2][-1]], [chosen[0][-1]]]), cache)[:, -1])
            for row, token in zip((2, 0), next_B.argmax(-1).tolist(), strict=True):
                chosen[row].append(token)
    assert chosen[0] == expected[0] and chosen[2] == expected[2]
    assert cache.batch_size == 2


def test_a_cache_never_outgrows_its_capacity_or_the_context_window(model: Transformer) -> None:
    with pytest.raises(ValueError, match="cache capacity 49 > max_seq_len=48"):
        model.new_cache(1, 49)
    cache = model.new_cache(1, 6)
    with torch.no_grad():
        model.decode(torch.tensor([_prompt(5, seed=4)]), cache)
        model.decode(torch.tensor([[3]]), cache)
        with pytest.raises(ValueError, match="6 cached \\+ 1 new positions exceed the cache capacity 6"):
            model.decode(torch.tensor([[3]]), cache)


def test_decoding_is_refused_while_moe_layers_drop_tokens_at_capacity() -> None:
    config = _config("tiny_qwen_moe")
    config.moe.capacity_factor = 1.0
    # With a capacity, which copy is dropped depends on the other tokens of the pass: one token at a time would
    # route differently from the full sequence.
    with pytest.raises(ValueError, match=r"blocks \[0, 1\] drop tokens at capacity"):
        Transformer(config).new_cache(1)


def test_training_neither_builds_nor_reads_a_cache_and_decoding_changes_no_model_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _deepseek().train()
    tokens_BS = torch.tensor([_prompt(12, seed=5)])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    reference = model(tokens_BS).logits
    with torch.no_grad():
        model.decode(tokens_BS, model.new_cache(1))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)

    def no_cache(*args: object, **kwargs: object) -> None:
        raise AssertionError("the training path built a key/value cache")

    monkeypatch.setattr(KVCache, "__init__", no_cache)
    model.activation_checkpointing = True
    logits = model(tokens_BS).logits
    logits.sum().backward()
    assert torch.equal(logits, reference)
