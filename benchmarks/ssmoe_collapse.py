"""Does SSMoE (arXiv 2605.30992) undo router collapse better than honest controls? Load health and loss vs c.

Trains two tiny Qwen-style MoE language models on the demo corpus (bytes of the Shakespeare texts, so no
tokenizer is needed): one with the Switch balance loss, one without any balancing (the learned router is
free to collapse). Four scenarios are then evaluated on held-out text:

- ``trained``: the balanced model as trained;
- ``trained_unbalanced``: the model trained without a balancing loss;
- ``identical_rows``: the balanced model with every router row replaced by the mean row plus 1 % noise
  (near-identical rows, the collapse SSMoE's paper describes);
- ``dominant_row``: the balanced model with one router row pushed along the mean hidden state entering the
  layer, so that expert 0 wins almost every token.

For each scenario and each blend weight c in {0, 0.25, 0.5, 1} three second routers are blended with the
learned one exactly as SSMoE blends U (docs/design/ssmoe.md §3, §7): ``ssmoe`` (U from the experts' singular vectors),
``uniform`` (U = 0, i.e. ``(1 − c)·p + c/E``) and ``random`` (random orthonormal rows with the norms of U).
c = 0 is the learned router for all three. Reported per cell: load entropy / log E, dead-expert fraction and
coefficient of variation of the expert loads (averaged over MoE layers; loads over the whole evaluation
set), and validation loss (nats per byte). Writes JSON (``--out``) and an SVG plot (``--plot``).

    python benchmarks/ssmoe_collapse.py --out benchmarks/results/ssmoe_collapse.json \\
        --plot benchmarks/results/ssmoe_collapse.svg
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from reporting import environment, write_result
from torch import Tensor

from sdmoe_train.cli.ssmoe_eval import evaluate_blend
from sdmoe_train.models.config import AttentionConfig, MoEConfig, TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.ssmoe_router import SSMoEConfig, apply_spectral_routing, set_spectral_blend, spectral_routers

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare"
BLENDS = (0.0, 0.25, 0.5, 1.0)
CONTROLS = ("ssmoe", "uniform", "random")
METRICS = ("load_entropy", "dead_expert_fraction", "load_cv", "val_loss")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder of .txt files (demo corpus)")
    parser.add_argument("--steps", type=int, default=250, help="training steps of each tiny model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-sequences", type=int, default=64, help="held-out sequences evaluated per cell")
    parser.add_argument("--k", type=int, default=50, help="ssmoe.k (clamped to the rank)")
    parser.add_argument("--tau", type=float, default=1.0, help="ssmoe.tau")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--plot", type=Path, default=None, help="write an SVG plot here")
    return parser.parse_args()


def tiny_config(aux_loss_coef: float) -> TransformerConfig:
    """Byte-level vocabulary, hidden 64, 2 layers of 8 experts (width 128), top-2, softmax routing."""
    return TransformerConfig(
        vocab_size=256,
        hidden_dim=64,
        n_layers=2,
        dense_hidden_dim=128,
        max_seq_len=128,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden_dim=128, aux_loss_coef=aux_loss_coef),
    )


def load_bytes(corpus: Path) -> tuple[Tensor, Tensor]:
    """(train, validation) byte streams: the last 5 % of every file is held out."""
    train, val = [], []
    for path in sorted(corpus.glob("*.txt")):
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        cut = int(len(data) * 0.95)
        train.append(data[:cut])
        val.append(data[cut:])
    if not train:
        raise SystemExit(
            f"no .txt files in {corpus}; pass --corpus, or install the demo corpus (data/shakespeare) with "
            "`make demo-corpus`"
        )
    return torch.from_numpy(np.concatenate(train)).long(), torch.from_numpy(np.concatenate(val)).long()


def windows(stream: Tensor, count: int, length: int, generator: torch.Generator) -> Tensor:
    starts = torch.randint(0, len(stream) - length - 1, (count,), generator=generator)
    return torch.stack([stream[start : start + length + 1] for start in starts.tolist()])


def train(config: TransformerConfig, stream: Tensor, args: argparse.Namespace) -> tuple[Transformer, float]:
    torch.manual_seed(args.seed)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    loss = torch.zeros(())
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        batch = windows(stream, args.batch_size, args.seq_len, generator)
        out = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss + out.moe.loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval(), float(loss.detach())


@torch.no_grad()
def layer_inputs(model: Transformer, batch: Tensor) -> list[Tensor]:
    """Mean normalised hidden state entering each MoE layer on a probe batch."""
    means: list[Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, inputs: means.append(inputs[0].flatten(0, 1).mean(dim=0)))
        for _, layer in model.moe_layers()
    ]
    model(batch[:, :-1])
    for hook in hooks:
        hook.remove()
    return means


@torch.no_grad()
def collapse(model: Transformer, kind: str, probe: Tensor, generator: torch.Generator) -> Transformer:
    """A copy of ``model`` whose learned routers are collapsed (see the module docstring)."""
    collapsed = copy.deepcopy(model)
    means = layer_inputs(collapsed, probe)
    for (_, layer), mean_D in zip(collapsed.moe_layers(), means, strict=True):
        weight_ED = layer.router.weight
        if kind == "identical_rows":
            mean_row_D = weight_ED.mean(dim=0)
            noise_ED = (
                torch.randn(weight_ED.shape, generator=generator)
                * 0.01
                * mean_row_D.norm()
                / math.sqrt(weight_ED.shape[1])
            )
            weight_ED.copy_(mean_row_D + noise_ED)
        else:
            # +6 logits on the mean input: expert 0 beats every other expert on almost every token.
            weight_ED[0] += 6.0 * mean_D / mean_D.square().sum()
    return collapsed


@torch.no_grad()
def with_control(model: Transformer, control: str, args: argparse.Namespace) -> Transformer:
    """``model`` with spectral routers whose U is SSMoE's, zero (uniform) or random orthonormal rows."""
    routed = copy.deepcopy(model)
    apply_spectral_routing(routed, SSMoEConfig(enabled=True, c=0.0, k=args.k, tau=args.tau, refresh_every=0))
    generator = torch.Generator().manual_seed(args.seed + 1)
    for _, router in spectral_routers(routed):
        rows_ED = router.spectral_rows
        if control == "uniform":
            rows_ED.zero_()
        elif control == "random":
            directions_DE = torch.linalg.qr(torch.randn(rows_ED.shape[1], rows_ED.shape[0], generator=generator)).Q
            rows_ED.copy_(directions_DE.T * rows_ED.norm(dim=-1, keepdim=True))
    return routed


def evaluate_scenario(model: Transformer, batches: list[Tensor], args: argparse.Namespace) -> dict:
    routed = {control: with_control(model, control, args) for control in CONTROLS}
    rows = []
    for blend in BLENDS:
        for control in CONTROLS if blend > 0 else ("learned",):
            target = routed["ssmoe" if control == "learned" else control]
            set_spectral_blend(target, blend)
            metrics = evaluate_blend(target, batches)
            rows.append({"c": blend, "router": control, **{name: metrics[name] for name in METRICS}})
    return {"rows": rows}


def print_table(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    print(f"{'c':>5} {'router':>8} {'load H/logE':>12} {'dead':>6} {'CV':>6} {'val loss':>9}")
    for row in rows:
        print(
            f"{row['c']:5.2f} {row['router']:>8} {row['load_entropy']:12.3f} {row['dead_expert_fraction']:6.3f} "
            f"{row['load_cv']:6.3f} {row['val_loss']:9.4f}"
        )


COLORS = {"ssmoe": "#d62728", "uniform": "#1f77b4", "random": "#2ca02c"}


def write_svg(scenarios: dict[str, dict], path: Path) -> None:
    """One panel per (scenario, metric): the metric against c for each router; c = 0 is shared."""
    panel_w, panel_h, margin = 220, 150, 40
    names = list(scenarios)
    width, height = margin + len(METRICS) * (panel_w + margin), margin + len(names) * (panel_h + margin) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="11"><rect width="100%" height="100%" fill="white"/>'
    ]
    for row_index, name in enumerate(names):
        rows = scenarios[name]["rows"]
        for col_index, metric in enumerate(METRICS):
            left = margin + col_index * (panel_w + margin)
            top = margin + row_index * (panel_h + margin)
            values = [row[metric] for row in rows]
            low, high = min(values), max(values)
            if high - low < 1e-9:
                low, high = low - 0.5, high + 0.5

            def x_of(c: float, left: int = left) -> float:
                return left + c * panel_w

            def y_of(v: float, top: int = top, low: float = low, high: float = high) -> float:
                return top + panel_h - (v - low) / (high - low) * panel_h

            parts.append(f'<rect x="{left}" y="{top}" width="{panel_w}" height="{panel_h}" fill="none" stroke="#999"/>')
            parts.append(f'<text x="{left}" y="{top - 6}">{name}: {metric}</text>')
            parts.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{high:.3g}</text>')
            parts.append(f'<text x="{left - 4}" y="{top + panel_h}" text-anchor="end">{low:.3g}</text>')
            learned = next(row for row in rows if row["router"] == "learned")
            for control, color in COLORS.items():
                points = [(0.0, learned[metric])] + [(r["c"], r[metric]) for r in rows if r["router"] == control]
                coords = " ".join(f"{x_of(c):.1f},{y_of(v):.1f}" for c, v in points)
                parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
                parts.extend(
                    f'<circle cx="{x_of(c):.1f}" cy="{y_of(v):.1f}" r="2.5" fill="{color}"/>' for c, v in points
                )
            for c in BLENDS:
                parts.append(f'<text x="{x_of(c):.1f}" y="{top + panel_h + 12}" text-anchor="middle">{c:g}</text>')
    legend_y = height - 12
    for index, (control, color) in enumerate(COLORS.items()):
        x = margin + index * 120
        parts.append(f'<rect x="{x}" y="{legend_y - 9}" width="12" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 16}" y="{legend_y}">{control}</text>')
    parts.append(f'<text x="{margin + 380}" y="{legend_y}">x axis: blend weight c (c = 0: learned router)</text>')
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    print(f"wrote {path}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    train_stream, val_stream = load_bytes(args.corpus)
    generator = torch.Generator().manual_seed(args.seed + 2)
    eval_batches = list(windows(val_stream, args.eval_sequences, args.seq_len, generator).split(16))
    probe = windows(val_stream, 16, args.seq_len, generator)
    balanced, balanced_loss = train(tiny_config(aux_loss_coef=0.01), train_stream, args)
    unbalanced, unbalanced_loss = train(tiny_config(aux_loss_coef=0.0), train_stream, args)
    print(
        f"trained two models in {time.perf_counter() - started:.0f} s "
        f"(last train loss {balanced_loss:.3f} balanced, {unbalanced_loss:.3f} unbalanced)"
    )
    collapse_generator = torch.Generator().manual_seed(args.seed + 3)
    models = {
        "trained": balanced,
        "trained_unbalanced": unbalanced,
        "identical_rows": collapse(balanced, "identical_rows", probe, collapse_generator),
        "dominant_row": collapse(balanced, "dominant_row", probe, collapse_generator),
    }
    scenarios = {}
    for name, model in models.items():
        scenarios[name] = evaluate_scenario(model, eval_batches, args)
        print_table(name, scenarios[name]["rows"])
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")
    result = {
        "benchmark": "ssmoe_collapse",
        "environment": environment(),
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "eval_tokens": args.eval_sequences * args.seq_len,
            "k": args.k,
            "tau": args.tau,
            "seed": args.seed,
            "model": "byte-level, hidden 64, 2 MoE layers of 8 experts (width 128), top-2, softmax",
        },
        "train_loss": {"trained": balanced_loss, "trained_unbalanced": unbalanced_loss},
        "scenarios": scenarios,
        "seconds": elapsed,
    }
    write_result(result, args.out)
    if args.plot is not None:
        write_svg(scenarios, args.plot)


if __name__ == "__main__":
    main()
