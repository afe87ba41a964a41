"""Cost of document-masked attention against plain causal attention at seq_len 1024 on CPU.

Packed training sequences hold several documents; with ``data.cross_document_attention: false`` each
token attends only within its own document. This script times forward + backward of the attention op
for the demo models' shapes (GQA: 4 query / 2 key-value heads of width 32; MLA: 4 heads, query/key
width 48, value width 32), 8 sequences of 1024 tokens, for:

* ``causal``: ``scaled_dot_product_attention(is_causal=True)``, what runs without masking;
* ``packed``: our kernel (:mod:`sdmoe_train.models.document_attention`), which gathers each document
  into its own causal row;
* ``bool_mask``: ``scaled_dot_product_attention`` with the block-diagonal causal mask as a boolean
  tensor, the other kernel PyTorch offers on CPU (FlexAttention has no CPU backward in PyTorch 2.13);

and one full training step (forward, backward, AdamW) of the demo model (``tiny_qwen_moe`` with
``max_seq_len`` 1024) with masking and restarted positions against without. Document lengths are drawn
from an exponential distribution with the given means (300 tokens: short documents, like the Bible
chapters; 3000: mostly one boundary per sequence); the mask layout is rebuilt for every call, as
training does. Variants run alternately, round after round, so machine noise hits all alike; the
ratios of medians are reported with the machine load.

    python benchmarks/doc_attention.py --out benchmarks/results/doc_attention.json

On a machine shared with other jobs, also run it with ``OMP_WAIT_POLICY=PASSIVE``: with libgomp's default
active waiting, a thread spins while its partner is descheduled, which penalises a kernel of many small
ops (the packed one) far more than one big op.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from reporting import environment, write_result

from sdmoe_train.models import presets
from sdmoe_train.models.document_attention import DocumentMask, document_ids, positions_in_documents
from sdmoe_train.models.transformer import Transformer, language_model_loss

SEQ_LEN = 1024
BATCH = 8
EOS = 0
SHAPES = {
    "gqa": {"heads": 4, "kv_heads": 2, "qk_dim": 32, "v_dim": 32},
    "mla": {"heads": 4, "kv_heads": 4, "qk_dim": 48, "v_dim": 32},
}
"""Attention shapes of the tiny Qwen (GQA) and DeepSeek (MLA) presets."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mean-doc-tokens", type=int, nargs="+", default=[300, 3000])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (each runs every variant once)")
    parser.add_argument("--step-rounds", type=int, default=5, help="timed rounds of the full training step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def packed_tokens(mean_doc_tokens: int, seed: int = 0) -> torch.Tensor:
    """(BATCH, SEQ_LEN) random token ids with EOS after documents of exponentially distributed length."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 4096, (BATCH, SEQ_LEN), generator=generator)
    for row in range(BATCH):
        position = int(torch.empty(1).exponential_(1 / mean_doc_tokens, generator=generator)) % mean_doc_tokens
        while position < SEQ_LEN:
            tokens[row, position] = EOS
            position += 1 + int(torch.empty(1).exponential_(1 / mean_doc_tokens, generator=generator))
    return tokens


def time_rounds(variants: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of every variant, ``rounds`` times, alternating their order.

    CPU time (all threads of this process) is reported beside wall time because on a shared machine the
    wall time of multi-threaded kernels also measures how long the threads waited to be scheduled.
    """
    for run in variants.values():
        run()  # warm-up
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
    for round_index in range(rounds):
        names = list(variants)
        for name in names if round_index % 2 == 0 else reversed(names):
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def attention_variants(tokens: torch.Tensor, shape: dict[str, int]) -> dict[str, Callable[[], None]]:
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(BATCH, shape["heads"], SEQ_LEN, shape["qk_dim"], generator=generator, requires_grad=True)
    k = torch.randn(BATCH, shape["kv_heads"], SEQ_LEN, shape["qk_dim"], generator=generator, requires_grad=True)
    v = torch.randn(BATCH, shape["kv_heads"], SEQ_LEN, shape["v_dim"], generator=generator, requires_grad=True)
    gqa = shape["kv_heads"] != shape["heads"]
    grad = torch.randn(BATCH, shape["heads"], SEQ_LEN, shape["v_dim"], generator=generator)
    index = torch.arange(SEQ_LEN)

    def backward(out: torch.Tensor) -> None:
        torch.autograd.grad(out, (q, k, v), grad)

    def causal() -> None:
        backward(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa))

    def packed() -> None:
        backward(DocumentMask(document_ids(tokens, EOS), "packed").attend(q, k, v))

    def bool_mask() -> None:
        ids = document_ids(tokens, EOS)
        mask = (ids[:, None, :, None] == ids[:, None, None, :]) & (index[:, None] >= index[None, :])
        backward(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa))

    return {"causal": causal, "packed": packed, "bool_mask": bool_mask}


def step_variants(tokens: torch.Tensor) -> dict[str, Callable[[], None]]:
    config = presets.tiny_qwen_moe()
    config.max_seq_len = SEQ_LEN
    runs = {}
    for masked in (False, True):
        torch.manual_seed(0)
        model = Transformer(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(
            model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer, masked: bool = masked
        ) -> None:
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            extra: dict[str, Any] = {}
            if masked:
                ids = document_ids(inputs, EOS)
                extra = {"document_ids_BS": ids, "positions_BS": positions_in_documents(ids)}
            out = model(inputs, **extra)
            loss = language_model_loss(out.logits, targets) + out.moe.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        runs["masked" if masked else "unmasked"] = step
    return runs


def summarise(times: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        medians = {name: statistics.median(values[clock]) for name, values in times.items()}
        summary[f"{clock}_median_ms"] = {name: round(value * 1e3, 2) for name, value in medians.items()}
        summary[f"{clock}_ratio_to_{baseline}"] = {
            name: round(value / medians[baseline], 3) for name, value in medians.items()
        }
    return summary


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "environment": environment(),
        "threads": args.threads,
        # libgomp's default (active) wait spins for threads that a busy machine has descheduled, which
        # inflates every small parallel op; PASSIVE sleeps instead.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "seq_len": SEQ_LEN,
        "batch": BATCH,
        "load_average_before": os.getloadavg(),
        "attention_fwd_bwd": {},
        "training_step": {},
    }
    for mean in args.mean_doc_tokens:
        tokens = packed_tokens(mean)
        boundaries = int((tokens == EOS).sum())
        for name, shape in SHAPES.items():
            summary = summarise(time_rounds(attention_variants(tokens, shape), args.rounds), "causal")
            result["attention_fwd_bwd"][f"{name}_mean_doc_{mean}"] = {"documents_ended": boundaries, **summary}
            print(f"attention {name}, mean document {mean} tokens ({boundaries} EOS): {summary}", flush=True)
        step_tokens = torch.cat([tokens, tokens[:, :1]], dim=1)
        summary = summarise(time_rounds(step_variants(step_tokens), args.step_rounds), "unmasked")
        result["training_step"][f"tiny_qwen_moe_mean_doc_{mean}"] = summary
        print(f"training step, mean document {mean} tokens: {summary}", flush=True)
    result["load_average_after"] = os.getloadavg()
    write_result(result, args.out)


if __name__ == "__main__":
    main()
