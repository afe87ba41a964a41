"""Data throughput on the demo corpus: preparing it against raw tokenization, and the loader against the model.

1. ``prepare``: tokens per second of building the token cache of the Shakespeare demo corpus (what
   ``sdmoe-train prepare`` does after the tokenizer exists: read the plays with ``datasets``, tokenize with
   ``data.corpus.num_proc`` processes, split, write the arrays), against the raw rate of
   ``Tokenizer.encode_batch`` over the same texts on the same cores (the tokenizers library's own
   thread pool). Goal: ratio >= 0.8.
2. Loader: batches per second the train DataLoader of the demo recipe delivers (8 x 257 tokens from the
   memory-mapped cache, mixture sampler or single-corpus sampler) against training steps per second of the
   demo model (``tiny_qwen_moe``, forward + backward + AdamW, fp32). The loader must never be the
   bottleneck: the ratio should be far above 1.

Variants run alternately, round after round; medians are reported with the machine load, as wall-clock rates
and as rates per CPU second (this process's threads plus the tokenizing worker processes): on a shared machine
the wall clock favours whichever variant runs more threads, the CPU time does not.

    make demo-corpus && python benchmarks/data_prepare.py --out benchmarks/results/data_prepare.json
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from reporting import environment, write_result

from sdmoe_train.data.cache import build_token_cache
from sdmoe_train.data.config import CorpusSource, DataConfig
from sdmoe_train.data.datamodule import PretrainDataModule
from sdmoe_train.data.tokenizer import encode_documents, eos_token_id, train_tokenizer
from sdmoe_train.models import presets
from sdmoe_train.models.transformer import Transformer, language_model_loss


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/shakespeare/*.txt", help="the demo corpus (make demo-corpus)")
    parser.add_argument("--second-corpus", default="data/kjv/*.txt", help="mixture partner, if present")
    parser.add_argument("--num-proc", type=int, default=2, help="data.corpus.num_proc of the demo recipe")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--model-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def prepare_rates(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tokenizer = train_tokenizer([args.corpus], 4096, work / "tokenizer.json")
    texts = [path.read_text(encoding="utf-8") for path in sorted(Path().glob(args.corpus))]
    eos = eos_token_id(tokenizer)
    num_tokens = sum(len(ids) for ids in encode_documents(tokenizer, texts, eos))

    def raw() -> None:
        encode_documents(tokenizer, texts, eos)

    def prepare() -> None:
        config = DataConfig(
            data_files=[args.corpus],
            tokenizer=str(work / "tokenizer.json"),
            cache_dir=str(work / f"cache_{time.monotonic_ns()}"),
            num_proc=args.num_proc,
            val_fraction=0.05,
        )
        build_token_cache(config, tokenizer)

    times: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": []} for name in ("raw_encode_batch", "prepare")
    }
    prepare()  # warm-up: imports, datasets' first-use costs
    for round_index in range(args.rounds):
        for name, run in (("raw_encode_batch", raw), ("prepare", prepare))[:: 1 if round_index % 2 == 0 else -1]:
            wall, cpu = time.perf_counter(), _cpu_seconds()
            run()
            times[name]["cpu"].append(_cpu_seconds() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    result: dict[str, Any] = {"documents": len(texts), "tokens": num_tokens, "goal": "prepare / raw >= 0.8"}
    for clock in ("wall", "cpu"):
        rates = {name: num_tokens / statistics.median(values[clock]) for name, values in times.items()}
        result[f"{clock}_seconds"] = {
            name: [round(value, 3) for value in values[clock]] for name, values in times.items()
        }
        result[f"{clock}_tokens_per_second"] = {name: round(rate) for name, rate in rates.items()}
        result[f"{clock}_prepare_over_raw"] = round(rates["prepare"] / rates["raw_encode_batch"], 3)
    return result


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes (tokenizing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def loader_rate(data: PretrainDataModule, batches: int) -> float:
    # What Lightning provides to the hooks that count consumed batches (the mixture advances its position).
    data.trainer = SimpleNamespace(
        global_rank=0,
        world_size=1,
        training=True,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        lightning_module=SimpleNamespace(example_input_array=None),
    )
    data.prepare_data()
    data.setup("fit")
    loader = data.train_dataloader()
    started = time.perf_counter()
    count = 0
    while count < batches:
        for batch in loader:
            data.on_before_batch_transfer(batch, 0)
            count += 1
            if count == batches:
                break
    return batches / (time.perf_counter() - started)


def model_rate(steps: int) -> float:
    torch.manual_seed(0)
    model = Transformer(presets.tiny_qwen_moe())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 4096, (8, 257))

    def step() -> None:
        out = model(batch[:, :-1])
        (language_model_loss(out.logits, batch[:, 1:]) + out.moe.loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - started)


def loader_rates(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    shared = {"tokenizer": str(work / "tokenizer.json"), "cache_dir": str(work / "loader_cache"), "val_fraction": 0.05}
    modules = {"single_corpus": PretrainDataModule(DataConfig(data_files=[args.corpus], **shared), batch_size=8)}
    if any(Path().glob(args.second_corpus)):
        corpora = [
            CorpusSource(name="shakespeare", data_files=[args.corpus], weight=0.6),
            CorpusSource(name="kjv", data_files=[args.second_corpus], weight=0.4),
        ]
        modules["mixture"] = PretrainDataModule(DataConfig(**shared), batch_size=8, corpora=corpora)
    result: dict[str, Any] = {"model_steps_per_second": round(model_rate(args.model_steps), 3)}
    for name, data in modules.items():
        rate = loader_rate(data, args.loader_batches)
        result[f"{name}_loader_batches_per_second"] = round(rate, 1)
        result[f"{name}_loader_over_model"] = round(rate / result["model_steps_per_second"], 1)
    return result


def main() -> None:
    args = parse_args()
    if not any(Path().glob(args.corpus)):
        raise SystemExit(f"no files match {args.corpus}; run `make demo-corpus` first")
    result: dict[str, Any] = {
        "environment": environment(),
        "cpu_count": os.cpu_count(),
        "num_proc": args.num_proc,
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        result["prepare"] = prepare_rates(args, work)
        print(f"prepare: {result['prepare']}", flush=True)
        result["loader"] = loader_rates(args, work)
        print(f"loader: {result['loader']}", flush=True)
    result["load_average_after"] = os.getloadavg()
    write_result(result, args.out)


if __name__ == "__main__":
    main()
