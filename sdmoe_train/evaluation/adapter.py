"""The lm-evaluation-harness model ``sdmoe``: our :class:`Transformer` scored and decoded in-process, no export.

:class:`SDMoELM` answers lm-eval's three request types:

- ``loglikelihood`` of a continuation after a context: requests are sorted by length (longest first, so a
  batch holds similar lengths and pads little), batched, and scored in one forward pass each; requests that
  share all but the last continuation token share one forward pass (lm-eval's ``Collator`` groups them).
  Only the hidden states that predict continuation tokens are projected onto the vocabulary, not every
  position of the batch (lm-eval's ``hf`` model computes all (B, S, V) logits).
  Inputs longer than the model's ``max_seq_len`` lose tokens on the left, as in lm-eval's ``hf`` model.
- ``loglikelihood_rolling`` (perplexity): each text is cut into lm-eval's disjoint windows of ``max_seq_len``
  tokens (the first one conditioned on the end-of-text token), every window of every text is scored in the
  same sorted batches, and a text's windows are summed (skipping the greedy check, which perplexity never reads).
- ``generate_until``: greedy decoding, batched, until a stop sequence, the end-of-text token or
  ``max_gen_toks`` new tokens. The prompts of a batch run left-padded through the model once, filling a
  key/value cache (:meth:`Transformer.decode <sdmoe_train.models.transformer.Transformer.decode>`); then each
  step feeds only the tokens just chosen, and rows that have finished leave the batch. Only each row's last
  position is projected onto the vocabulary. As in lm-eval's ``hf`` model, prompt and generation share the
  context window: a prompt keeps its last ``max_seq_len - max_gen_toks`` tokens.

Token conventions match lm-eval's ``hf`` model on an exported checkpoint (``sdmoe-train export``), so both
give the same numbers: texts are encoded without special tokens, an empty context is the end-of-text token
(documents follow one in training), and log-probabilities are computed in fp32 whatever the autocast dtype.
Scoring batches are padded on the right, generation batches on the left with the padding masked out; the model
is causal and evaluation routes without capacity limits (:func:`~sdmoe_train.evaluation.isolation.evaluation_mode`),
so padding never changes a real token's score or a generated token.

Data-parallel evaluation: with ``distributed=True`` inside an initialised ``torch.distributed`` process
group, lm-eval gives each rank a share of the documents and gathers the per-document metrics on rank 0
through :meth:`all_gather`, :meth:`gather_object` and :meth:`barrier`.
"""

# Shape key: B sequences in a batch, S tokens, V vocabulary, N scored tokens.

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tokenizers import Tokenizer
from torch import Tensor
from tqdm import tqdm

from sdmoe_train.data.tokenizer import eos_token_id
from sdmoe_train.errors import ConfigError
from sdmoe_train.models.kv_cache import KVCache
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.parallel import collectives

DEFAULT_MAX_GEN_TOKS = 256
"""New tokens a generation may add when its task sets no ``max_gen_toks`` (lm-eval's default)."""

_TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]
"""(original strings or None, context tokens, continuation tokens), as lm-eval's ``TemplateLM`` passes them."""


@register_model("sdmoe")
class SDMoELM(TemplateLM):
    """lm-eval model over an in-memory :class:`Transformer` and its ``tokenizers`` tokenizer.

    Args:
        model: the model, already on its device; evaluation runs where its parameters are.
        tokenizer: the tokenizer it was trained with (the recipe's ``data.corpus.tokenizer``).
        batch_size: sequences per forward pass.
        autocast_dtype: run the forward passes under ``torch.autocast`` in this dtype (bf16 on GPUs, as in
            training); None runs in the parameters' dtype.
        max_gen_toks: default for ``generate_until`` requests that set none.
        distributed: split documents across the ranks of the default process group.
        show_progress: draw progress bars (on rank 0).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 16,
        autocast_dtype: torch.dtype | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        distributed: bool = False,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if max_gen_toks < 1:
            raise ConfigError(f"max_gen_toks={max_gen_toks} must be >= 1")
        vocab = tokenizer.get_vocab_size()
        if vocab > model.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {vocab} tokens but the model's vocabulary is {model.config.vocab_size}: "
                "evaluate with the tokenizer the model was trained with (the recipe's data.corpus.tokenizer)"
            )
        self.model = model
        self.text_tokenizer = tokenizer
        self._eot_token_id = eos_token_id(tokenizer)
        self._batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self._max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device
        self.show_progress = show_progress
        if distributed:
            self._rank, self._world_size = collectives.default_group_rank_and_size()

    @property
    def eot_token_id(self) -> int:
        return self._eot_token_id

    @property
    def max_length(self) -> int:
        """Longest input the model takes (``max_seq_len``)."""
        return self.model.config.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # Training streams are `doc EOS doc EOS ...` without other special tokens; scoring uses the same ids.
        return self.text_tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.text_tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in the results' ``config`` section."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype),
            "max_length": self.max_length,
            "eot_token_id": self.eot_token_id,
        }

    # ---------------------------------------------------------------- scoring

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def _loglikelihood_tokens(
        self, requests: list[_TokenRequest], disable_tqdm: bool = False, *, check_greedy: bool = True, **kwargs: Any
    ) -> list[tuple[float, bool | None]]:
        """(sum of log-probabilities, whether greedy decoding yields it) of each continuation.

        ``check_greedy=False`` skips the argmax over the vocabulary at every scored position (rolling
        log-likelihoods use only the sums) and gives None for the flag.
        """
        for _, _, continuation in requests:
            if not 0 < len(continuation) <= self.max_length:
                raise ConfigError(
                    f"a continuation of {len(continuation)} tokens cannot be scored by a model with "
                    f"max_seq_len={self.max_length}; use a task with shorter answers"
                )
        collator = Collator(
            requests,
            sort_fn=lambda request: (-len(request[1]) - len(request[2]), tuple(request[1] + request[2])),
            group_by="contexts",
            group_fn=lambda request: request[1] + request[2][:-1],
        )
        results: list[tuple[float, bool | None]] = []
        progress = tqdm(total=len(requests), disable=self._quiet(disable_tqdm), desc="loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            # The last continuation token is only predicted, never fed; overlong inputs lose the left.
            inputs = [(context + continuation)[-(self.max_length + 1) : -1] for _, context, continuation in chunk]
            # Only the positions that predict continuation tokens reach the vocabulary projection.
            spans = [range(len(row) - len(request[2]), len(row)) for row, request in zip(inputs, chunk, strict=True)]
            logprobs_NV = self._log_probs(inputs, spans)
            rows_per_request = [len(span) for span in spans]
            for (strings, context, continuation), logprobs_MV in zip(
                chunk, logprobs_NV.split(rows_per_request), strict=True
            ):
                for strings_, continuation_, logprobs_ in collator.get_cache(
                    req_str=strings, cxt_toks=context, cont_toks=continuation, logits=logprobs_MV.unsqueeze(0)
                ):
                    answer = _score(logprobs_[0], continuation_, check_greedy)
                    results.append(answer)
                    if strings_ is not None:
                        self.cache_hook.add_partial("loglikelihood", strings_, answer)
                    progress.update(1)
        progress.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text over disjoint windows of ``max_seq_len`` tokens."""
        windows: list[_TokenRequest] = []
        owners: list[int] = []
        for index, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        scored = self._loglikelihood_tokens(windows, disable_tqdm, check_greedy=False)
        for owner, (logprob, _) in zip(owners, scored, strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut before the first of its stop sequences."""
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        end_of_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str] = []
        progress = tqdm(total=len(requests), disable=self._quiet(disable_tqdm), desc="generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_settings = zip(*chunk, strict=True)
            settings = normalize_gen_kwargs(all_settings[0], self.max_gen_toks)
            if settings.get("do_sample"):
                raise ConfigError(
                    f"a task asks for sampled generation ({dict(all_settings[0])}); the sdmoe model decodes "
                    "greedily: override the task's generation settings with do_sample=false"
                )
            stops = handle_stop_sequences(settings.get("until"), eos=end_of_text)
            prompts = [self.tok_encode(context) or [self.prefix_token_id] for context in contexts]
            for context, tokens in zip(contexts, self._greedy(prompts, stops, settings["max_gen_toks"]), strict=True):
                text = postprocess_generated_text(self.tok_decode(tokens), stop=stops, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_settings[0]), text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def _greedy(self, prompts: list[list[int]], stops: list[str], max_new_tokens: int) -> list[list[int]]:
        """New tokens of each prompt, until the end-of-text token, a stop sequence or ``max_new_tokens``.

        Raises:
            ConfigError: if ``max_new_tokens`` leaves no room for a prompt in the context window.
        """
        if max_new_tokens < 1:
            return [[] for _ in prompts]
        room = self.max_length - max_new_tokens
        if room < 1:
            raise ConfigError(
                f"generating up to max_gen_toks={max_new_tokens} tokens leaves no room for the prompt in the "
                f"model's context of max_seq_len={self.max_length} tokens (prompt and generation share it, as in "
                "lm-eval's hf model): lower the task's generation_kwargs.max_gen_toks, or --max_gen_toks for "
                "tasks that set none"
            )
        prompts = [prompt[-room:] for prompt in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        rows = list(range(len(prompts)))  # the prompt each cache row decodes
        cache = self.model.new_cache(len(prompts), max(map(len, prompts)) + max_new_tokens - 1)
        logits_BV = self._next_token_logits(*self._left_padded(prompts), cache)
        for step in range(max_new_tokens):
            next_tokens = logits_BV.argmax(dim=-1).tolist()
            kept = []
            for row, (index, token) in enumerate(zip(rows, next_tokens, strict=True)):
                generated[index].append(token)
                if token != self.eot_token_id and not self._reached_stop(generated[index], stops):
                    kept.append(row)
            if not kept or step == max_new_tokens - 1:
                break
            if len(kept) < len(rows):
                cache.keep_rows(torch.tensor(kept, device=self._device))
                rows = [rows[row] for row in kept]
            tokens_B1 = torch.tensor([[next_tokens[row]] for row in kept], device=self._device)
            logits_BV = self._next_token_logits(tokens_B1, None, cache)
        return generated

    def _reached_stop(self, tokens: list[int], stops: list[str]) -> bool:
        text = self.tok_decode(tokens)
        return any(stop and stop in text for stop in stops)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
        """The prompts as one (B, S) batch padded on the left, and the mask of their real tokens."""
        width = max(len(prompt) for prompt in prompts)
        tokens_BS = torch.full((len(prompts), width), self.eot_token_id, dtype=torch.long)
        valid_BS = torch.zeros((len(prompts), width), dtype=torch.bool)
        for index, prompt in enumerate(prompts):
            tokens_BS[index, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            valid_BS[index, width - len(prompt) :] = True
        return tokens_BS.to(self._device), valid_BS.to(self._device)

    def _quiet(self, disable_tqdm: bool) -> bool:
        return disable_tqdm or not self.show_progress or self.rank != 0

    # ---------------------------------------------------------------- model calls

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]], positions: list[range]) -> Tensor:
        """fp32 next-token log-probabilities (N, V) at ``positions[i]`` of each row, concatenated in row order.

        The rows run right-padded through the model; only the N selected hidden states are projected onto the
        vocabulary (the (B, S, V) logits of every position would mostly be thrown away).
        """
        width = max(len(row) for row in rows)
        tokens_BS = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for index, row in enumerate(rows):
            tokens_BS[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        batch_N = torch.tensor([index for index, span in enumerate(positions) for _ in span], dtype=torch.long)
        position_N = torch.tensor([position for span in positions for position in span], dtype=torch.long)
        tokens_BS, batch_N, position_N = (
            t.to(self._device, non_blocking=True) for t in (tokens_BS, batch_N, position_N)
        )
        with torch.autocast(self._device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            hidden_BSD, _ = self.model.hidden_states(tokens_BS, routing_stats=False)
            logits_NV = self.model.lm_head(hidden_BSD[batch_N, position_N])
        return F.log_softmax(logits_NV.float(), dim=-1)

    @torch.no_grad()
    def _next_token_logits(self, tokens_BS: Tensor, valid_BS: Tensor | None, cache: KVCache) -> Tensor:
        """fp32 logits (B, V) after each row's last token, feeding ``tokens_BS`` after those in ``cache``."""
        with torch.autocast(self._device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            hidden_BSD = self.model.decode(tokens_BS, cache, valid_BS)
            logits_BV = self.model.lm_head(hidden_BSD[:, -1])
        return logits_BV.float()

    # ---------------------------------------------------------------- data-parallel collectives (lm-eval's API)

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` stacked (0-d) or concatenated along dim 0."""
        return tensor if self.world_size == 1 else collectives.all_gather_tensor(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` on rank ``dst`` (None on the others)."""
        if self.world_size == 1:
            return [obj]
        gathered = collectives.all_gather_object(obj)
        return gathered if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            collectives.barrier()


def _score(logprobs_NV: Tensor, continuation: list[int], check_greedy: bool) -> tuple[float, bool | None]:
    """Sum of the log-probabilities of ``continuation`` in the last len(continuation) rows, and greediness
    (None without ``check_greedy``)."""
    logprobs_NV = logprobs_NV[-len(continuation) :]
    target_N = torch.as_tensor(continuation, device=logprobs_NV.device)
    greedy = bool((logprobs_NV.argmax(dim=-1) == target_N).all()) if check_greedy else None
    return float(logprobs_NV.gather(-1, target_N.unsqueeze(-1)).sum()), greedy
