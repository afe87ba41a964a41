"""``sdmoe-train evaluate``: downstream evaluation of a checkpoint with lm-evaluation-harness.

It loads a checkpoint of ``sdmoe-train fit`` (plain, SD-MoE or SSMoE; SD-MoE banks stay unmerged)
or the ``model.ckpt`` of ``sdmoe-train import`` through :class:`PretrainModule`, checks it against the recipe
(architecture and tokenizer), and runs lm-eval tasks on it in the recipe's precision through the ``sdmoe``
model of :mod:`sdmoe_train.evaluation.adapter`. ``sdmoe-train build-eval-tasks`` (:mod:`.build_eval_tasks`)
writes the offline tasks it runs by default.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from tokenizers import Tokenizer

from sdmoe_train.checkpointing.manifest import checkpoint_problem
from sdmoe_train.checkpointing.run_identity import IDENTITY_KEY, identity_differences
from sdmoe_train.cli.outputs import check_output_file
from sdmoe_train.cli.recipe import recipe_data_parser
from sdmoe_train.data.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_identity
from sdmoe_train.errors import ConfigError
from sdmoe_train.evaluation import require_lm_eval
from sdmoe_train.evaluation.isolation import autocast_dtype, preserved_rng_state
from sdmoe_train.evaluation.options import check_run_options
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.ssmoe_router import SSMoEConfig

USAGE = """\
  sdmoe-train evaluate --config RECIPE.yaml --ckpt_path CKPT --tasks T1,T2 [--limit N] [--num_fewshot K]
                       [--batch_size B] [--include_path DIR] [--out results.json] [--device cpu|cuda]
                       [--ssmoe.c C]
      run lm-eval tasks (shipped offline: shakespeare = shakespeare_last_word, _next_line, _perplexity)
"""

ARCH_FIELDS_IGNORED = ("init_std", "moe.capacity_factor", "moe.aux_loss_coef", "moe.seq_aux_loss_coef")
ARCH_FIELDS_IGNORED += ("moe.z_loss_coef", "moe.bias_update_rate")
"""Architecture settings that only steer training (evaluation routes without capacity limits), not compared."""


def _recipe_parser(prog: str, description: str) -> ArgumentParser:
    """A recipe parser that also reads ``model.arch`` (the other ``model`` settings are accepted unread)."""
    parser = recipe_data_parser(prog, description, own_options=("model", "ckpt_path"))
    parser.add_class_arguments(TransformerConfig, "model.arch")
    for name in inspect.signature(PretrainModule.__init__).parameters:
        if name not in ("self", "arch"):
            parser.add_argument(f"--model.{name}", type=Any, default=None)
    return parser


def _evaluate_parser() -> ArgumentParser:
    parser = _recipe_parser(
        "sdmoe-train evaluate", "Evaluate a checkpoint on lm-evaluation-harness tasks (offline or from the hub)."
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="a .ckpt of `sdmoe-train fit` or `import`")
    parser.add_argument("--tasks", type=str, required=True, help="comma-separated task, group or tag names (globs)")
    parser.add_argument("--limit", type=int | float | None, default=None, help="documents per task (or a share < 1)")
    parser.add_argument("--num_fewshot", type=int | None, default=None, help="examples per prompt (task default)")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--include_path", type=str | None, default=None, help="comma-separated task directories")
    parser.add_argument("--out", type=str | None, default=None, help="write lm-eval's results JSON here")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        type=str | None,
        default=None,
        help="Lightning precision (bf16-mixed, 32-true, ...); default: the recipe's trainer.precision on a GPU, "
        "fp32 on a CPU",
    )
    parser.add_argument(
        "--tokenizer",
        type=str | None,
        default=None,
        help="tokenizer.json or directory; default: the one next to an imported model.ckpt, else data.corpus.tokenizer",
    )
    # --ssmoe.c routes with SSMoE at that blend weight (the other --ssmoe.* set how U is built); unset, the
    # checkpoint routes as it trained.
    parser.add_class_arguments(SSMoEConfig, "ssmoe", skip={"enabled"})
    parser.set_defaults({"ssmoe.c": None})
    parser.add_argument("--bootstrap_iters", type=int, default=100_000, help="bootstrap resamples for stderr (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's seed (few-shot sampling)")
    parser.add_argument("--max_gen_toks", type=int, default=256, help="generation length when a task sets none")
    return parser


def evaluate(argv: list[str]) -> dict[str, Any]:
    """``sdmoe-train evaluate``: print lm-eval's table, optionally write its JSON; returns the results."""
    require_lm_eval("sdmoe-train evaluate")
    parser = _evaluate_parser()
    config = parser.parse_args(argv)
    tasks = [name.strip() for name in config.tasks.split(",") if name.strip()]
    include_path = [path.strip() for path in (config.include_path or "").split(",") if path.strip()]
    check_run_options(
        "--",
        limit=config.limit,
        num_fewshot=config.num_fewshot,
        batch_size=config.batch_size,
        max_gen_toks=config.max_gen_toks,
        bootstrap_iters=config.bootstrap_iters,
    )
    if config.out is not None:
        check_output_file(config.out, "--out")
    device = _device(config.device)
    ssmoe_settings = config.pop("ssmoe").as_dict()
    ssmoe = None if ssmoe_settings["c"] is None else SSMoEConfig(**ssmoe_settings, enabled=True)
    parsed = parser.instantiate(config)
    tokenizer_path = _tokenizer_path(config.tokenizer, config.ckpt_path, parsed.data.corpus.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path)

    from sdmoe_train.evaluation.adapter import SDMoELM
    from sdmoe_train.evaluation.runner import evaluate_tasks, results_table, write_results
    from sdmoe_train.evaluation.tasks import resolve_tasks

    started = time.perf_counter()
    resolved = resolve_tasks(tasks, include_path)
    model = load_evaluation_model(config.ckpt_path, parsed.model.arch, tokenizer, ssmoe)
    precision = _precision(config.precision, (config.trainer or {}).get("precision"), device)
    dtype = autocast_dtype(precision, device)
    if precision.endswith("-true") and dtype is not None:
        model.to(dtype)  # trained in that dtype throughout, not under autocast
    model.to(device)
    lm = SDMoELM(model, tokenizer, batch_size=config.batch_size, autocast_dtype=dtype, max_gen_toks=config.max_gen_toks)
    results = evaluate_tasks(
        lm,
        resolved,
        limit=config.limit,
        num_fewshot=config.num_fewshot,
        bootstrap_iters=config.bootstrap_iters,
        seed=config.seed,
    )
    assert results is not None, "a single-process evaluation always returns results"
    results["config"]["model"] = "sdmoe"
    results["config"]["model_args"] = {
        "ckpt_path": config.ckpt_path,
        "tokenizer": str(tokenizer_path),
        "precision": precision,
        "ssmoe": None if ssmoe is None else dataclasses.asdict(ssmoe),
    }
    elapsed = time.perf_counter() - started
    print(
        f"sdmoe (ckpt_path={config.ckpt_path}, device={device}, precision={precision}"
        f"{'' if ssmoe is None else f', ssmoe.c={ssmoe.c}'}), limit={config.limit}, "
        f"num_fewshot={config.num_fewshot}, batch_size={config.batch_size}: {elapsed:.1f} s"
    )
    print(results_table(results))
    if config.out is not None:
        write_results(results, config.out)
        print(f"results written to {config.out}")
    return results


def load_evaluation_model(
    ckpt_path: str | Path,
    recipe_arch: TransformerConfig | None,
    tokenizer: Tokenizer,
    ssmoe: SSMoEConfig | None = None,
) -> Transformer:
    """The checkpoint's model, in eval mode on the CPU, checked against the recipe and the tokenizer.

    SD-MoE banks are kept (the model evaluates ``W_c + W_u[i]`` as it trained); an SSMoE checkpoint routes
    as it trained unless ``ssmoe`` chooses other settings (as ``ssmoe-eval`` does, its U is reused when it
    was built the same way and rebuilt from the weights otherwise). Global random states are left as they
    were.

    Args:
        ckpt_path: a ``.ckpt`` of ``sdmoe-train fit`` (consolidated, for expert-parallel runs) or the
            ``model.ckpt`` of ``sdmoe-train import``.
        recipe_arch: the recipe's ``model.arch`` (None: not compared).
        tokenizer: the tokenizer the evaluation will use.
        ssmoe: SSMoE routing to evaluate with; None routes as the checkpoint trained.

    Raises:
        ConfigError: a missing or damaged file, a DeepSpeed checkpoint directory, a file that is no
            PretrainModule checkpoint, or a model that differs from the recipe or the tokenizer.
    """
    path = Path(ckpt_path)
    if path.is_dir():
        raise ConfigError(
            f"--ckpt_path={str(path)!r} is a DeepSpeed checkpoint directory; consolidate it into one file first: "
            f"sdmoe-train consolidate {path} consolidated.ckpt"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"--ckpt_path={str(path)!r} cannot be evaluated: {problem}")
    # A training checkpoint is the user's own output (the same trust as `fit --ckpt_path`).
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    _check_against_recipe(checkpoint, recipe_arch, tokenizer, path)
    overrides: dict[str, Any] = {"init_from": None, "parallel": None}  # the weights are in the file; all experts here
    if ssmoe is not None:
        overrides["ssmoe"] = ssmoe
    with preserved_rng_state():  # building the model draws initial weights
        module = PretrainModule.load_from_checkpoint(path, map_location="cpu", **overrides)
    return module.model.eval()


def check_module_checkpoint(checkpoint: Any, path: str | Path) -> dict[str, Any]:
    """The hyper-parameters of a loaded :class:`PretrainModule` checkpoint, which ``load_from_checkpoint`` needs.

    Raises:
        ConfigError: If ``checkpoint`` has no ``arch`` hyper-parameter or is no Lightning checkpoint.
    """
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or "arch" not in hparams:
        raise ConfigError(
            f"--ckpt_path={str(path)!r} has no model architecture ('arch' hyper-parameter): evaluate a checkpoint "
            "of `sdmoe-train fit` or the model.ckpt of `sdmoe-train import`"
        )
    if "pytorch-lightning_version" not in checkpoint:
        raise ConfigError(
            f"--ckpt_path={str(path)!r} is not a Lightning checkpoint (no 'pytorch-lightning_version' entry): "
            "evaluate a checkpoint of `sdmoe-train fit` or the model.ckpt of `sdmoe-train import`"
        )
    return hparams


def _check_against_recipe(
    checkpoint: Any, recipe_arch: TransformerConfig | None, tokenizer: Tokenizer, path: Path
) -> None:
    hparams = check_module_checkpoint(checkpoint, path)
    recorded = (checkpoint.get("sdmoe_train") or {}).get(IDENTITY_KEY) or {}
    saved = {"arch": _arch_fields(hparams["arch"])}
    if "tokenizer" in recorded:  # imported models and old checkpoints record none
        saved["tokenizer"] = recorded["tokenizer"]
    current: dict[str, Any] = {"tokenizer": tokenizer_identity(tokenizer)}
    if recipe_arch is not None:
        current["arch"] = _arch_fields(recipe_arch)
    differences = identity_differences(saved, current)
    if differences:
        raise ConfigError(
            f"--ckpt_path={str(path)!r} does not match the recipe and tokenizer in {len(differences)} setting(s):\n  "
            + "\n  ".join(differences)
            + "\nevaluate with the recipe (or the config.yaml saved in the run directory) and the tokenizer the "
            "checkpoint was trained with"
        )


def _arch_fields(arch: Any) -> dict[str, Any]:
    """The architecture as nested dicts, defaults resolved (``sdmoe-train import`` writes them out) and the
    training-only settings left out."""
    fields = dataclasses.asdict(arch) if dataclasses.is_dataclass(arch) else dict(arch)
    attention = dict(fields.get("attention") or {})
    if attention.get("head_dim") is None and attention.get("mla") is None and attention.get("num_heads"):
        attention["head_dim"] = fields["hidden_dim"] // attention["num_heads"]
    fields["attention"] = attention
    if isinstance(fields.get("moe"), dict) and fields["moe"].get("shared_expert_hidden_dim") is None:
        fields["moe"] = {**fields["moe"], "shared_expert_hidden_dim": fields["moe"]["expert_hidden_dim"]}
    for name in ARCH_FIELDS_IGNORED:
        section, _, key = name.rpartition(".")
        if not section:
            fields.pop(key, None)
        elif isinstance(fields.get(section), dict):
            fields[section] = {k: v for k, v in fields[section].items() if k != key}
    return fields


def _tokenizer_path(explicit: str | None, ckpt_path: str, recipe_tokenizer: str) -> Path:
    if explicit is not None:
        return Path(explicit)
    beside = Path(ckpt_path).parent / TOKENIZER_FILE
    return beside if beside.is_file() else Path(recipe_tokenizer)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device={name!r} is not a device (auto, cpu, cuda, cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name!r}: no CUDA device is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device={name!r}: only cpu and cuda devices are supported")
    return device


def _precision(explicit: str | None, recipe: Any, device: torch.device) -> str:
    """The precision to evaluate in: the explicit one, else the recipe's on a GPU; a CPU runs fp32 unless told."""
    if explicit is not None:
        return explicit
    if device.type == "cpu":
        # bf16/fp16 autocast is emulated on most CPUs (about 20x slower) and fp32 scores at least as exactly.
        return "32-true"
    return "bf16-mixed" if recipe is None else str(recipe)


def run(argv: list[str]) -> None:
    """Run ``evaluate`` with its arguments (ConfigError propagates to the caller)."""
    evaluate(argv)
