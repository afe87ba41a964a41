"""Hugging Face export of training checkpoints and import of HF checkpoints as weights to start from.

``export_checkpoint`` reads a Lightning ``.ckpt`` of :class:`PretrainModule` (``state_dict`` keys prefixed
``model.``, hyper-parameters ``arch`` and, with SD-MoE, ``sdmoe``), merges SD-MoE banks back into plain
experts (``W_c + W_u[i]``) and writes a transformers directory; a checkpoint with SSMoE spectral routers is
refused (transformers has no such router) unless the caller drops them and exports the learned router.
``import_checkpoint`` writes the opposite:
a recipe-ready ``model.yaml`` (the ``model.arch`` section) and a weights-only ``model.ckpt`` that
``PretrainModule.load_from_checkpoint`` reads and ``model.init_from`` starts a new run from. It holds no
optimizer or loop state, so it cannot be given to ``fit --ckpt_path`` (that resumes a run).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from sdmoe_train.checkpointing.model_state import MODEL_PREFIX, model_state
from sdmoe_train.errors import ConfigError
from sdmoe_train.interop.hf.driver import HFExport, export_model, import_model
from sdmoe_train.interop.hf.families import adapter_for
from sdmoe_train.interop.hf.files import TOKENIZER_FILES, parse_size, read_hf_config
from sdmoe_train.interop.hf.target import check_output_dir, clear_owned_files
from sdmoe_train.io import atomic_path, copy_file_atomically, write_text_atomically
from sdmoe_train.models.config import AttentionConfig, MLAConfig, MoEConfig, TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import SDMoEConfig, apply_spectral_decoupling, is_decoupled_state, merge_spectral_decoupling
from sdmoe_train.moe.ssmoe_router import SSMoEConfig, is_spectral_state, without_spectral_rows

ConfigT = TypeVar("ConfigT")

IMPORTED_ARCH_FILE = "model.yaml"
IMPORTED_WEIGHTS_FILE = "model.ckpt"
IMPORT_FILES = frozenset({IMPORTED_ARCH_FILE, IMPORTED_WEIGHTS_FILE, *TOKENIZER_FILES})
"""Files an import writes, which ``import --overwrite`` removes before writing."""


def _arch(value: TransformerConfig | dict[str, Any]) -> TransformerConfig:
    """The ``arch`` hyper-parameter as a config (checkpoints written from a plain dict store a dict)."""
    if isinstance(value, TransformerConfig):
        return value
    fields = dict(value)
    attention = dict(fields.pop("attention", None) or {})
    if attention.get("mla") is not None:
        attention["mla"] = MLAConfig(**attention["mla"])
    moe = fields.pop("moe", {})
    return TransformerConfig(
        **fields, attention=AttentionConfig(**attention), moe=None if moe is None else MoEConfig(**moe)
    )


def _config_hparam(value: Any, config_type: type[ConfigT]) -> ConfigT | None:
    """A config hyper-parameter as its dataclass (checkpoints written under LightningCLI store plain dicts)."""
    return value if value is None or isinstance(value, config_type) else config_type(**value)


def load_checkpoint_model(ckpt_path: str | Path, drop_ssmoe: bool = False) -> Transformer:
    """The fp32 :class:`Transformer` of a training checkpoint, with SD-MoE banks merged into plain experts.

    Args:
        ckpt_path: a :class:`PretrainModule` checkpoint.
        drop_ssmoe: discard SSMoE spectral routers and keep only the learned ones (the model then routes
            as SSMoE with c = 0); without it such a checkpoint is refused.

    Raises:
        ConfigError: missing file, no ``arch`` hyper-parameter, decoupled banks without ``sdmoe``, or SSMoE
            spectral routers without ``drop_ssmoe``.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        # A training checkpoint is the user's own output (the same trust as `fit --ckpt_path`); it holds
        # Lightning and jsonargparse objects that the weights-only unpickler rejects.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConfigError(
            f"checkpoint {str(path)!r} is truncated or not a checkpoint ({error}); export an earlier checkpoint "
            "of the run"
        ) from error
    hparams = (checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    if "arch" not in hparams:
        raise ConfigError(f"{path}: no 'arch' hyper-parameter; is it a PretrainModule checkpoint?")
    try:
        model = Transformer(_arch(hparams["arch"]))
    except (TypeError, AttributeError) as error:
        raise ConfigError(f"{path}: its 'arch' hyper-parameter is not a model architecture ({error})") from error
    state = model_state(checkpoint)
    if is_spectral_state(state):
        if not drop_ssmoe:
            ssmoe = _config_hparam(hparams.get("ssmoe"), SSMoEConfig)
            blend = f", c={ssmoe.c}" if ssmoe is not None else ""
            raise ConfigError(
                f"{path} routes with SSMoE spectral routers (ssmoe.enabled=true{blend}), and transformers has no "
                "such router, so the exported model could not route like this checkpoint. Pass --drop_ssmoe to "
                "export the learned routers only (the model then routes as SSMoE with c = 0; compare both with "
                "`sdmoe-train ssmoe-eval` first), or export a checkpoint trained without SSMoE"
            )
        state = without_spectral_rows(state)
    decoupled = is_decoupled_state(state)
    if decoupled:
        sdmoe = _config_hparam(hparams.get("sdmoe"), SDMoEConfig)
        if sdmoe is None:
            raise ConfigError(f"{path}: expert banks are SD-MoE decoupled but the 'sdmoe' hyper-parameter is missing")
        apply_spectral_decoupling(model, sdmoe)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(f"{path}: its weights do not fit its own 'arch' hyper-parameter ({error})") from error
    if decoupled:
        merge_spectral_decoupling(model)
    return model.eval()


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    arch: str | None = None,
    tokenizer: str | Path | None = None,
    max_shard_size: str | int = "5GB",
    drop_ssmoe: bool = False,
    overwrite: bool = False,
) -> HFExport:
    """Write a training checkpoint as a transformers checkpoint directory (see :func:`export_model`).

    ``drop_ssmoe`` exports a checkpoint with SSMoE spectral routers by keeping only its learned routers
    (see :func:`load_checkpoint_model`); ``overwrite`` replaces an earlier export in ``out_dir``.

    Returns:
        The family written (chosen from the config when ``arch`` is None) and the settings converted.
    """
    check_output_dir(Path(out_dir), overwrite)  # before the (possibly large) checkpoint is read
    parse_size(max_shard_size)
    model = load_checkpoint_model(ckpt_path, drop_ssmoe)
    return export_model(
        model, out_dir, arch=arch, tokenizer=tokenizer, max_shard_size=max_shard_size, overwrite=overwrite
    )


@dataclass
class HFImport:
    """What :func:`import_checkpoint` wrote."""

    weights: Path
    """``model.ckpt``: the weights, loadable by ``PretrainModule.load_from_checkpoint`` and ``model.init_from``."""
    arch_file: Path
    """``model.yaml``: the ``model.arch`` section of a recipe."""
    notes: list[str] = field(default_factory=list)
    """Settings converted rather than copied (one line each), for the user to see."""


def import_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    upcycle_experts: int | None = None,
    upcycle_top_k: int = 2,
    overwrite: bool = False,
) -> HFImport:
    """Turn a transformers checkpoint directory into a model preset plus weights our trainer reads.

    Writes ``out_dir/model.yaml`` (the ``model.arch`` section of a recipe), ``out_dir/model.ckpt``
    (``state_dict`` with ``model.`` keys and hyper-parameter ``arch``) and copies the tokenizer files.
    ``upcycle_experts`` turns a dense checkpoint's MLPs into that many identical experts (top-``upcycle_top_k``).
    ``out_dir`` must be empty or new; ``overwrite`` replaces an earlier import there.

    Returns:
        The files written and the settings converted on the way.
    """
    out = Path(out_dir)
    if out.resolve() == Path(hf_dir).resolve():
        raise ConfigError(f"import writes next to, not into, the checkpoint {hf_dir}: give another OUT_DIR")
    check_output_dir(out, overwrite)
    settings = read_hf_config(hf_dir)
    adapter = adapter_for(settings.get("model_type"))
    model = import_model(hf_dir, upcycle_experts, upcycle_top_k)
    clear_owned_files(out, IMPORT_FILES)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    notes = adapter.conversion_notes(config)
    upcycled = "" if upcycle_experts is None else f", MLPs upcycled into {upcycle_experts} experts"
    header = (
        f"# Architecture imported from {Path(hf_dir).resolve()} ({adapter.model_type}{upcycled}).\n"
        "# Training-only settings (balancing losses, bias update rate) are defaults; set them for your run.\n"
        + "".join(f"# Converted: {note}\n" for note in notes)
    )
    arch_yaml = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    write_text_atomically(out / IMPORTED_ARCH_FILE, header + arch_yaml)
    checkpoint = {
        "state_dict": {MODEL_PREFIX + key: value for key, value in model.state_dict().items()},
        "hyper_parameters": {"arch": config},
        "pytorch-lightning_version": importlib.metadata.version("lightning"),
    }
    with atomic_path(out / IMPORTED_WEIGHTS_FILE) as temp:
        torch.save(checkpoint, temp)
    for name in TOKENIZER_FILES:
        if (Path(hf_dir) / name).is_file():
            copy_file_atomically(Path(hf_dir) / name, out / name)
    return HFImport(out / IMPORTED_WEIGHTS_FILE, out / IMPORTED_ARCH_FILE, notes)
