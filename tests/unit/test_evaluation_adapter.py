"""The lm-eval model ``sdmoe``: its scores equal direct computations with the model, its generation stops where
it must, and batching, truncation and padding never change a result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from sdmoe_train.errors import ConfigError  # noqa: E402
from sdmoe_train.evaluation.adapter import SDMoELM  # noqa: E402
from sdmoe_train.evaluation.isolation import evaluation_mode  # noqa: E402
from sdmoe_train.models.config import TransformerConfig  # noqa: E402
from sdmoe_train.models.kv_cache import KVCache  # noqa: E402
from sdmoe_train.models.transformer import Transformer  # noqa: E402
from sdmoe_train.moe import layer as layer_module  # noqa: E402
from tests.corpora import make_documents, make_tokenizer  # noqa: E402

MAX_SEQ_LEN = 24


@pytest.fixture
def tokenizer(tmp_path: Path) -> Tokenizer:
    return make_tokenizer(tmp_path, make_documents(count=12))[1]


@pytest.fixture
def model(tiny_config: TransformerConfig) -> Transformer:
    tiny_config.vocab_size = 300
    tiny_config.max_seq_len = MAX_SEQ_LEN
    return Transformer(tiny_config).eval()


def _request(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _direct_logprob(model: Transformer, tokens: list[int], scored: int) -> float:
    """Sum of log p(token) over the last ``scored`` tokens of ``tokens`` (fed whole, no truncation)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0].float()
    logprobs = F.log_softmax(logits, dim=-1)[-scored:]
    return float(logprobs.gather(-1, torch.tensor(tokens[-scored:]).unsqueeze(-1)).sum())


PAIRS = [
    ("the king hath", " never come"),
    ("doc001: thou doth", " speak the sword of the queen"),
    ("storm", " sea"),
    ("", "the ghost is death"),
]


def test_loglikelihood_equals_the_models_own_log_probabilities(model: Transformer, tokenizer: Tokenizer) -> None:
    lm = SDMoELM(model, tokenizer, batch_size=3)
    results = lm.loglikelihood([_request("loglikelihood", *pair) for pair in PAIRS])
    eos = lm.eot_token_id
    for (context, continuation), (logprob, _) in zip(PAIRS, results, strict=True):
        whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
        context_ids = tokenizer.encode(context, add_special_tokens=False).ids if context else []
        continuation_ids = whole[len(context_ids) :]
        tokens = (context_ids or [eos]) + continuation_ids
        assert logprob == pytest.approx(_direct_logprob(model, tokens, len(continuation_ids)), abs=1e-5)


def test_loglikelihood_does_not_depend_on_batching_or_padding(model: Transformer, tokenizer: Tokenizer) -> None:
    requests = [_request("loglikelihood", *pair) for pair in PAIRS * 2]
    one_by_one = SDMoELM(model, tokenizer, batch_size=1).loglikelihood(requests)
    batched = SDMoELM(model, tokenizer, batch_size=8).loglikelihood(requests)
    for single, together in zip(one_by_one, batched, strict=True):
        assert single[0] == pytest.approx(together[0], abs=1e-5)
        assert single[1] == together[1]


def test_only_the_scored_positions_are_projected_onto_the_vocabulary(model: Transformer, tokenizer: Tokenizer) -> None:
    projected_rows: list[int] = []
    model.lm_head.register_forward_hook(lambda _, inputs, __: projected_rows.append(inputs[0].shape[0]))
    lm = SDMoELM(model, tokenizer, batch_size=8)
    requests = [_request("loglikelihood", *pair) for pair in PAIRS if pair[0]]
    lm.loglikelihood(requests)
    continuation_tokens = sum(len(lm._encode_pair(*request.args)[1]) for request in requests)
    assert projected_rows == [continuation_tokens]


def test_a_context_longer_than_the_model_keeps_its_last_tokens(model: Transformer, tokenizer: Tokenizer) -> None:
    context = " ".join(["the king hath never come to thee"] * 8)
    lm = SDMoELM(model, tokenizer)
    ((logprob, _),) = lm.loglikelihood([_request("loglikelihood", context, " storm")])
    whole = tokenizer.encode(context + " storm", add_special_tokens=False).ids
    continuation = len(whole) - len(tokenizer.encode(context, add_special_tokens=False).ids)
    assert len(whole) > MAX_SEQ_LEN + 1
    assert logprob == pytest.approx(_direct_logprob(model, whole[-(MAX_SEQ_LEN + 1) :], continuation), abs=1e-5)


def test_greedy_flag_is_true_exactly_for_the_models_argmax_continuation(
    model: Transformer, tokenizer: Tokenizer
) -> None:
    context = tokenizer.encode("the king hath", add_special_tokens=False).ids
    tokens = list(context)
    with torch.no_grad():
        for _ in range(3):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    greedy_continuation = tokens[len(context) :]
    wrong_first_token = [(greedy_continuation[0] + 1) % 300]
    lm = SDMoELM(model, tokenizer)
    (_, greedy), (_, not_greedy) = lm._loglikelihood_tokens(
        [(None, context, greedy_continuation), (None, context, wrong_first_token)]
    )
    assert greedy and not not_greedy


def test_requests_sharing_a_context_group_with_a_longer_continuation_score_their_own_tokens(
    model: Transformer, tokenizer: Tokenizer
) -> None:
    # (P, [x, y]) and (P + [x], [z]) feed the same tokens P + [x]: lm-eval's Collator scores both from one
    # forward pass, whose last rows belong to each request's continuation.
    prefix = tokenizer.encode("the king hath never", add_special_tokens=False).ids
    x, y, z = 40, 41, 42
    lm = SDMoELM(model, tokenizer, batch_size=4)
    together = lm._loglikelihood_tokens([(None, prefix, [x, y]), (None, [*prefix, x], [z])])
    assert together[0][0] == pytest.approx(_direct_logprob(model, [*prefix, x, y], 2), abs=1e-5)
    assert together[1][0] == pytest.approx(_direct_logprob(model, [*prefix, x, z], 1), abs=1e-5)


def test_rolling_loglikelihood_is_the_sum_of_every_tokens_log_probability(
    model: Transformer, tokenizer: Tokenizer
) -> None:
    short = "the queen is dead"
    long = " ".join(["why doth the fool speak of death and the sea"] * 6)
    lm = SDMoELM(model, tokenizer, batch_size=4)
    totals = lm.loglikelihood_rolling(
        [_request("loglikelihood_rolling", short), _request("loglikelihood_rolling", long)]
    )
    eos = lm.eot_token_id
    tokens = tokenizer.encode(short, add_special_tokens=False).ids
    assert totals[0] == pytest.approx(_direct_logprob(model, [eos, *tokens], len(tokens)), abs=1e-5)

    # Disjoint windows of MAX_SEQ_LEN predicted tokens: the first conditioned on EOS, each later one on the
    # token before it only, the last one reaching back for a full window of context.
    tokens = tokenizer.encode(long, add_special_tokens=False).ids
    assert len(tokens) > 2 * MAX_SEQ_LEN
    expected, start = _direct_logprob(model, [eos, *tokens[:MAX_SEQ_LEN]], MAX_SEQ_LEN), MAX_SEQ_LEN
    while start < len(tokens):
        end = min(start + MAX_SEQ_LEN, len(tokens))
        window = tokens[max(0, end - MAX_SEQ_LEN - 1) : end]
        expected += _direct_logprob(model, window, end - start)
        start = end
    assert totals[1] == pytest.approx(expected, abs=1e-4)


def test_scoring_and_generation_compute_no_routing_statistics(
    model: Transformer, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = SDMoELM(model, tokenizer, batch_size=2)
    expected = lm.loglikelihood([_request("loglikelihood", *pair) for pair in PAIRS])

    def refuse(*args: object) -> None:
        raise AssertionError("inference computed a balancing loss")

    monkeypatch.setattr(layer_module, "load_balance_loss", refuse)
    with evaluation_mode(model):
        assert lm.loglikelihood([_request("loglikelihood", *pair) for pair in PAIRS]) == expected
        lm.loglikelihood_rolling([_request("loglikelihood_rolling", "the queen is dead")])
        _generate(lm, ["the king"], until=[], max_gen_toks=3)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tiny_config: TransformerConfig, tokenizer) -> None:
    tiny_config.vocab_size = 256
    with pytest.raises(ConfigError, match="tokenizer has 300 tokens but the model's vocabulary is 256"):
        SDMoELM(Transformer(tiny_config), tokenizer)


class _CountingModel(nn.Module):
    """A stand-in language model whose greedy next token is always the last input token + 1.

    Its "hidden states" are already the logits, so its ``lm_head`` is the identity. It records the token rows it
    is fed and the capacity of each cache it makes.
    """

    def __init__(self, vocab_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.config = TransformerConfig(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.scale = nn.Parameter(torch.ones(()))
        self.lm_head = nn.Identity()
        self.fed: list[list[list[int]]] = []
        self.capacities: list[int] = []

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        self.capacities.append(capacity)
        return KVCache(0, batch_size, capacity, torch.device("cpu"))

    def decode(self, tokens_BS: torch.Tensor, cache: KVCache, valid_BS: torch.Tensor | None = None) -> torch.Tensor:
        valid_BS = torch.ones_like(tokens_BS, dtype=torch.bool) if valid_BS is None else valid_BS
        cache.start_step(valid_BS)
        cache.finish_step()
        self.fed.append([row[valid].tolist() for row, valid in zip(tokens_BS, valid_BS, strict=True)])
        targets_BS = (tokens_BS + 1) % self.config.vocab_size
        return F.one_hot(targets_BS, self.config.vocab_size).float() * self.scale


def _generate(lm: SDMoELM, prompts: list[str], **settings: object) -> list[str]:
    return lm.generate_until([_request("generate_until", prompt, dict(settings)) for prompt in prompts])


def _counted(lm: SDMoELM, prompt: str, count: int) -> str:
    """What the counting model generates after ``prompt``: the ``count`` ids after the prompt's last one."""
    last = lm.tok_encode(prompt)[-1]
    return lm.tok_decode([(last + offset) % 300 for offset in range(1, count + 1)])


def test_generation_is_greedy_and_stops_at_the_first_stop_sequence(tokenizer: Tokenizer) -> None:
    lm = SDMoELM(_CountingModel(300, 64), tokenizer, batch_size=2)
    free = _generate(lm, ["a"], until=[], max_gen_toks=12)[0]
    assert free == _counted(lm, "a", 12) == "bcdefghijklm"
    assert _generate(lm, ["a"], until=["fg", "kl"], max_gen_toks=12)[0] == "bcde"
    assert _generate(lm, ["a"], until=["zz"], max_gen_toks=12)[0] == free


def test_generation_respects_max_gen_toks_and_the_end_of_text_token(tokenizer: Tokenizer) -> None:
    lm = SDMoELM(_CountingModel(300, 64), tokenizer)
    assert _generate(lm, ["k"], until=[], max_gen_toks=3)[0] == "lmn"
    assert lm.eot_token_id == 0
    # Counting up from id 297 reaches EOS (id 0) after two tokens, and generation ends there.
    before_eos = tokenizer.decode([297])
    assert lm.tok_encode(before_eos)[-1] == 297
    assert _generate(lm, [before_eos], until=[], max_gen_toks=10)[0] == tokenizer.decode([298, 299])


def test_batched_generation_of_prompts_of_different_lengths_equals_one_at_a_time(tokenizer: Tokenizer) -> None:
    prompts = ["a", "the king hath", "doc003: thou", "x"]
    single = [
        _generate(SDMoELM(_CountingModel(300, 64), tokenizer), [p], until=["q"], max_gen_toks=5)[0] for p in prompts
    ]
    lm = SDMoELM(_CountingModel(300, 64), tokenizer, batch_size=3)
    assert _generate(lm, prompts, until=["q"], max_gen_toks=5) == single
    assert single[0] == "bcdef" and single[3] == _counted(lm, "x", 5)


def test_a_prompt_keeps_its_last_tokens_leaving_room_for_max_gen_toks(tokenizer: Tokenizer) -> None:
    model = _CountingModel(300, 8)
    lm = SDMoELM(model, tokenizer)
    prompt = "the king hath never come to thee"
    assert len(lm.tok_encode(prompt)) > 5
    assert _generate(lm, [prompt], until=[], max_gen_toks=3)[0] == _counted(lm, prompt, 3)
    # As lm-eval's hf model: the prompt keeps its last max_seq_len - max_gen_toks tokens; the cache holds them
    # and every generated token but the last, which is never fed.
    assert model.fed[0] == [lm.tok_encode(prompt)[-5:]]
    assert model.capacities == [7]


def test_a_max_gen_toks_that_leaves_no_room_for_the_prompt_is_refused_and_zero_generates_nothing(
    tokenizer: Tokenizer,
) -> None:
    lm = SDMoELM(_CountingModel(300, 8), tokenizer)
    with pytest.raises(ConfigError, match="max_gen_toks=8 tokens leaves no room for the prompt .* max_seq_len=8"):
        _generate(lm, ["the king"], until=[], max_gen_toks=8)
    assert _generate(lm, ["the king"], until=[], max_gen_toks=0) == [""]


def test_finished_rows_leave_the_batch_and_the_others_decode_on(tokenizer: Tokenizer) -> None:
    model = _CountingModel(300, 64)
    lm = SDMoELM(model, tokenizer, batch_size=2)
    # "a" counts b, c, d, ... and stops at "d"; "k" counts l, m, n, ... past it.
    assert _generate(lm, ["a", "k"], until=["d"], max_gen_toks=5) == ["bc", _counted(lm, "k", 5)]
    assert [len(rows) for rows in model.fed] == [2, 2, 2, 1, 1]


def test_generation_equals_greedy_decoding_by_full_forward_passes_in_any_batch(
    tiny_config: TransformerConfig, tokenizer: Tokenizer
) -> None:
    tiny_config.vocab_size, tiny_config.max_seq_len = 300, MAX_SEQ_LEN
    tiny_config.init_std = 0.1  # logits far from ties, so float rounding cannot flip a greedy choice
    model = Transformer(tiny_config).eval()
    prompts = ["the king hath", "storm", " ".join(["why doth the fool speak of death"] * 4), "doc001: thou doth"]
    lm = SDMoELM(model, tokenizer, batch_size=1)
    expected = []
    for prompt in prompts:
        tokens = lm.tok_encode(prompt)[-(MAX_SEQ_LEN - 6) :]  # room for max_gen_toks=6 new tokens
        new: list[int] = []
        with torch.no_grad():
            while len(new) < 6 and lm.eot_token_id not in new:
                new.append(int(model(torch.tensor([tokens + new])).logits[0, -1].argmax()))
        expected.append(lm.tok_decode(new))
    assert len(lm.tok_encode(prompts[2])) > MAX_SEQ_LEN
    assert _generate(lm, prompts, until=[], max_gen_toks=6) == expected
    assert _generate(SDMoELM(model, tokenizer, batch_size=3), prompts, until=[], max_gen_toks=6) == expected


def test_sampled_generation_is_refused_with_the_setting_to_change(tokenizer: Tokenizer) -> None:
    lm = SDMoELM(_CountingModel(300, 64), tokenizer)
    with pytest.raises(ConfigError, match="do_sample=false"):
        _generate(lm, ["x"], until=["\n"], do_sample=True, temperature=0.7)


def test_evaluation_mode_turns_off_capacity_and_gradients_and_restores_both(tiny_config: TransformerConfig) -> None:
    tiny_config.moe.capacity_factor = 1.0
    model = Transformer(tiny_config).train()
    dispatchers = [layer.dispatcher for _, layer in model.moe_layers()]
    with evaluation_mode(model):
        assert not model.training and not torch.is_grad_enabled()
        assert all(dispatcher.capacity_factor is None for dispatcher in dispatchers)
    assert model.training and torch.is_grad_enabled()
    assert all(dispatcher.capacity_factor == 1.0 for dispatcher in dispatchers)
