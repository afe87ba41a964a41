"""``sdmoe-train ssmoe-eval``: validation loss and routing health of a checkpoint with SSMoE off and on.

SSMoE's published use (arXiv 2605.30992) is inference on a trained checkpoint: this command loads the
checkpoint's model once, builds the spectral routers U from its weights (or reuses the U saved in it when
it was trained with the same SSMoE settings), then evaluates the validation split of the recipe's data
section at every blend weight c (c = 0 is exactly the learned router) and prints one row per c.
``sdmoe-train validate --config RECIPE --ckpt_path CKPT --model.ssmoe.enabled true`` runs a single setting
through Lightning instead and logs the same routing health as ``val/<quantity>/layer_NN``.
"""

# Shape key: B sequences, S tokens, L MoE layers, E experts.

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from torch import Tensor

from sdmoe_train.checkpointing.manifest import checkpoint_problem
from sdmoe_train.cli.evaluate import check_module_checkpoint
from sdmoe_train.cli.outputs import check_output_file
from sdmoe_train.cli.recipe import recipe_data_parser
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import write_text_atomically
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models.transformer import Transformer, language_model_loss
from sdmoe_train.moe.diagnostics import load_health
from sdmoe_train.moe.ssmoe_router import SSMoEConfig, set_spectral_blend, spectral_routers

USAGE = """\
  sdmoe-train ssmoe-eval --config RECIPE.yaml --ckpt_path CKPT [--blends [0,0.25,0.5,1]] [--ssmoe.k 50]
      validation loss and routing health with the learned router (c = 0) and blended spectral routing
"""

DEFAULT_BLENDS = [0.0, 0.25, 0.5, 1.0]
TABLE_COLUMNS = (
    ("c", "c", "{:.2f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("perplexity", "ppl", "{:.2f}"),
    ("load_entropy", "load H/logE", "{:.3f}"),
    ("dead_expert_fraction", "dead", "{:.3f}"),
    ("load_cv", "CV", "{:.3f}"),
    ("changed_share", "changed", "{:.3f}"),
    ("spectral_entropy", "U H/logE", "{:.3f}"),
)


@torch.no_grad()
def evaluate_blend(model: Transformer, batches: Iterable[Tensor]) -> dict[str, float]:
    """Token-weighted validation loss and routing health of ``model`` as it routes now.

    Args:
        model: an MoE transformer (with spectral routers to report their diagnostics).
        batches: (B, S + 1) token blocks.

    Returns:
        ``val_loss``, ``perplexity``, and averaged over MoE layers: ``load_entropy``,
        ``dead_expert_fraction``, ``load_cv`` (from loads summed over all batches), ``changed_share`` and
        ``spectral_entropy`` (token-weighted means; 0 and NaN without spectral routers).
    """
    loss_sum, tokens, load_LE = 0.0, 0, None
    changed_sum, entropy_sum = 0.0, 0.0
    routers = [router for _, router in spectral_routers(model)]
    for batch in batches:
        inputs_BS, targets_BS = batch[:, :-1], batch[:, 1:]
        out = model(inputs_BS)
        if out.moe is None:
            raise ConfigError("ssmoe-eval needs an MoE checkpoint, but arch.moe is null")
        count = targets_BS.numel()
        loss_sum += float(language_model_loss(out.logits, targets_BS)) * count
        tokens += count
        load_LE = out.moe.tokens_per_expert_LE if load_LE is None else load_LE + out.moe.tokens_per_expert_LE
        if routers:
            changed_sum += count * sum(float(r.last_stats.changed_share) for r in routers) / len(routers)
            entropy_sum += count * sum(float(r.last_stats.spectral_entropy) for r in routers) / len(routers)
    if load_LE is None:
        raise ConfigError("the recipe's validation split is empty; set data.corpus.val_fraction > 0")
    health = load_health(load_LE).named()
    result = {"val_loss": loss_sum / tokens, "perplexity": math.exp(loss_sum / tokens)}
    for name in ("load_entropy", "dead_expert_fraction", "load_cv"):
        result[name] = sum(health[name].tolist()) / len(load_LE)
    result["changed_share"] = changed_sum / tokens
    result["spectral_entropy"] = entropy_sum / tokens if routers else float("nan")
    return result


def evaluate_blends(model: Transformer, batches: list[Tensor], blends: list[float]) -> list[dict[str, float]]:
    """:func:`evaluate_blend` at every blend weight c of the model's spectral routers (one row per c)."""
    rows = []
    for blend in blends:
        set_spectral_blend(model, blend)
        rows.append({"c": blend, **evaluate_blend(model, batches)})
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    """A fixed-width text table of :func:`evaluate_blends` rows."""
    widths = [max(len(title), 8) for _, title, _ in TABLE_COLUMNS]
    lines = ["  ".join(title.rjust(width) for (_, title, _), width in zip(TABLE_COLUMNS, widths, strict=True))]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in TABLE_COLUMNS]
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def _parser() -> ArgumentParser:
    parser = recipe_data_parser(
        "sdmoe-train ssmoe-eval",
        "Evaluate a checkpoint's validation loss and routing health with SSMoE off (c = 0) and on.",
        own_options=("ckpt_path",),
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="a .ckpt of `sdmoe-train fit` or `import`")
    parser.add_class_arguments(SSMoEConfig, "ssmoe", skip={"enabled", "c"})
    parser.add_argument("--blends", type=list[float], default=DEFAULT_BLENDS, help="values of c to evaluate")
    parser.add_argument(
        "--limit_val_batches",
        type=int | None,
        default=None,
        help="evaluate only this many batches (default: the recipe's trainer.limit_val_batches when an integer)",
    )
    parser.add_argument("--output", type=str | None, default=None, help="also write the rows to this JSON file")
    return parser


def run(argv: list[str]) -> list[dict[str, float]]:
    """``sdmoe-train ssmoe-eval``: print (and optionally write) one row of results per blend weight."""
    parser = _parser()
    config = parser.parse_args(argv)
    if Path(config.ckpt_path).is_dir():
        raise ConfigError(
            f"--ckpt_path={config.ckpt_path!r} is a directory; pass a .ckpt file (a DeepSpeed checkpoint directory: "
            f"consolidate it first with `sdmoe-train consolidate {config.ckpt_path} consolidated.ckpt`)"
        )
    # The same verification as resuming (manifest hashes, or at least a complete archive) before torch.load.
    problem = checkpoint_problem(config.ckpt_path)
    if problem is not None:
        raise ConfigError(f"--ckpt_path={config.ckpt_path!r} cannot be evaluated: {problem}")
    blends = [float(blend) for blend in config.blends]
    if not blends:
        raise ConfigError("--blends is empty; give the blend weights c to evaluate, e.g. --blends [0,0.5,1]")
    if config.limit_val_batches is not None and config.limit_val_batches < 1:
        raise ConfigError(f"--limit_val_batches={config.limit_val_batches} must be >= 1 (or left unset: every batch)")
    if config.output is not None:
        check_output_file(config.output, "--output")
    for blend in blends:
        SSMoEConfig(c=blend)  # validates the range with the usual message
    parsed = parser.instantiate(config)
    ssmoe = dataclasses.replace(parsed.ssmoe, enabled=True, c=0.0)
    check_module_checkpoint(
        torch.load(config.ckpt_path, map_location="cpu", weights_only=False, mmap=True), config.ckpt_path
    )
    module = PretrainModule.load_from_checkpoint(config.ckpt_path, map_location="cpu", ssmoe=ssmoe)
    module.eval()
    datamodule = parsed.data
    datamodule.prepare_data()  # builds or reuses the token cache, as `validate` does
    datamodule.setup("validate")
    limit = config.limit_val_batches
    if limit is None and isinstance((config.trainer or {}).get("limit_val_batches"), int):
        limit = config.trainer["limit_val_batches"]  # the recipe's, so the rows match `validate`
    batches = []
    loaders = datamodule.val_dataloader()
    # A mixture validates one loader per source; the limit applies to each, as in `validate`.
    for loader in loaders if isinstance(loaders, list) else [loaders]:
        for index, batch in enumerate(loader):
            if limit is not None and index >= limit:
                break
            batches.append(batch)
    rows = evaluate_blends(module.model, batches, blends)
    print(f"SSMoE evaluation of {config.ckpt_path} on {sum(len(b) for b in batches)} validation sequences")
    print(format_table(rows))
    if config.output is not None:
        report = {"ckpt": config.ckpt_path, "ssmoe": dataclasses.asdict(ssmoe), "rows": rows}
        write_text_atomically(config.output, json.dumps(report, indent=2))
    return rows
