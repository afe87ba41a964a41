"""Held-out perplexity of trained checkpoints, per source corpus: the study's downstream measure for now.

The held-out documents (``heldout/<source>.jsonl``, written by :mod:`evidence_corpus`) were never trained on
and are not the validation split either. Each source is tokenized like the training data (documents followed
by EOS), packed into the training ``seq_len`` windows, and every token after the stream's first is scored once
(up to the end of the last complete window; the few tokens after it are left out).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.data.tokenizer import encode_documents, eos_token_id
from sdmoe_train.lightning.module import PretrainModule


def heldout_tokens(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """The documents of a JSON-lines file as one token stream, each followed by EOS."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    ids = encode_documents(tokenizer, texts, eos_token_id(tokenizer))
    return np.fromiter((token for doc in ids for token in doc), dtype=np.int64)


@torch.no_grad()
def mean_token_loss(module: PretrainModule, tokens: np.ndarray, seq_len: int, batch_size: int) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, scored tokens) of a token stream, in seq_len windows."""
    blocks = PackedBlocks(tokens, seq_len, "held-out")
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch_BS = torch.stack([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
        logits_BSV = module(batch_BS[:, :-1]).float()
        targets_BS = batch_BS[:, 1:]
        total += float(F.cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten(), reduction="sum"))
        count += targets_BS.numel()
    return total / count, count


def heldout_perplexity(
    checkpoints: dict[str, Path], heldout: dict[str, Path], tokenizer: Tokenizer, seq_len: int, batch_size: int
) -> dict[str, dict[str, float]]:
    """Held-out loss and perplexity of every checkpoint on every source.

    Args:
        checkpoints: run id -> final checkpoint of that run.
        heldout: source name -> held-out JSON-lines file.
        tokenizer: the study's tokenizer.
        seq_len: tokens per scored window (the training seq_len).
        batch_size: windows per forward pass.

    Returns:
        run id -> ``{"heldout_loss/<source>", "heldout_ppl/<source>", "heldout_tokens/<source>"}`` plus the
        token-weighted ``heldout_loss/all`` and ``heldout_ppl/all``.
    """
    streams = {source: heldout_tokens(path, tokenizer) for source, path in heldout.items()}
    results = {}
    for run_id, path in checkpoints.items():
        module = PretrainModule.load_from_checkpoint(path, map_location="cpu", weights_only=False)
        module.eval()
        metrics: dict[str, float] = {}
        total, count = 0.0, 0
        for source, tokens in streams.items():
            loss, scored = mean_token_loss(module, tokens, seq_len, batch_size)
            metrics[f"heldout_loss/{source}"] = loss
            metrics[f"heldout_ppl/{source}"] = math.exp(loss)
            metrics[f"heldout_tokens/{source}"] = float(scored)
            total, count = total + loss * scored, count + scored
        metrics["heldout_loss/all"] = total / count
        metrics["heldout_ppl/all"] = math.exp(total / count)
        results[run_id] = metrics
    return results
