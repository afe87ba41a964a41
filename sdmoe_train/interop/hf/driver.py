"""Export and import of whole models through a family adapter; nothing here names a family.

Export: pick the family (given, or the one whose refusal list is empty), write ``config.json`` from the
shared and family settings, map every tensor through the adapter's key pairs, write the routed experts
per expert, and write sharded safetensors. Import: the family named by ``config.json``'s ``model_type``
reads the settings (refusing what our model cannot express), then the same key pairs map the tensors back;
routed experts are read per expert or fused. The mapping is exact or refused, never approximate.
"""

# Shape key: E experts, F expert width, D model width.

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.interop.hf.adapter import BANKS, HFAdapter, common_hf_settings
from sdmoe_train.interop.hf.families import adapter_for, export_adapters
from sdmoe_train.interop.hf.files import (
    CONFIG_FILE,
    EXPORT_FILES,
    copy_tokenizer,
    end_of_text_id,
    load_safetensors,
    read_hf_config,
    save_safetensors,
    write_generation_config,
)
from sdmoe_train.interop.hf.target import check_output_dir, clear_owned_files
from sdmoe_train.interop.hf.upcycle import upcycle_dense_model
from sdmoe_train.io import write_text_atomically
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import decoupled_banks


@dataclass
class HFExport:
    """What :func:`export_model` wrote."""

    arch: str
    """The family's ``model_type``, e.g. ``qwen2_moe``."""
    model_class: str
    """The transformers class that loads the directory."""
    notes: list[str] = field(default_factory=list)
    """Settings converted rather than copied (one line each), for the user to see."""


def export_adapter(config: TransformerConfig, arch: str | None = None) -> HFAdapter:
    """The family to export ``config`` as: ``arch``, or the one that expresses it exactly.

    Raises:
        ConfigError: ``arch`` is import-only or unknown, or (``arch`` None) no family matches, listing each
            family's mismatches.
    """
    if arch is not None:
        adapter = adapter_for(arch)
        if not adapter.exportable:
            exportable = ", ".join(a.model_type for a in export_adapters())
            raise ConfigError(f"--arch={arch} can only be imported; export as one of {exportable}")
        return adapter
    reports = {adapter: adapter.export_problems(config) for adapter in export_adapters()}
    for adapter, problems in reports.items():
        if not problems:
            return adapter
    lines = [f"{adapter.model_type}: " + "; ".join(problems) for adapter, problems in reports.items()]
    raise ConfigError("arch matches no Hugging Face architecture exactly:\n  - " + "\n  - ".join(lines))


def hf_config(config: TransformerConfig, adapter: HFAdapter, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` contents of ``config`` exported as ``adapter``'s family (checked first)."""
    adapter.check_exportable(config)
    return common_hf_settings(config, adapter, dtype) | adapter.hf_settings(config)


def config_from_hf(hf: dict[str, Any], source: str | Path = CONFIG_FILE) -> TransformerConfig:
    """Our :class:`TransformerConfig` for a transformers ``config.json`` (its ``model_type`` picks the family).

    Raises:
        ConfigError: unsupported ``model_type``, a setting the family needs missing or of the wrong type
            (naming ``source``, the file it was read from), or listing every setting our model cannot express.
    """
    adapter = adapter_for(hf.get("model_type"))
    try:
        return adapter.config_from_hf(hf)
    except ConfigError:
        raise
    except KeyError as error:
        raise ConfigError(
            f"{source} lacks the setting {error} that {adapter.model_type} needs; is it complete?"
        ) from error
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source} has a setting of the wrong type for {adapter.model_type}: {error}") from error


def to_hf_state_dict(
    state: dict[str, Tensor], config: TransformerConfig, adapter: HFAdapter, hf: dict[str, Any]
) -> dict[str, Tensor]:
    """Our model's state dict (plain expert banks) as HF checkpoint tensors.

    Args:
        state: ``Transformer.state_dict()``; routed banks ``blocks.{i}.ffn.experts.{gate,up}_proj`` (E, F, D)
            and ``down_proj`` (E, D, F).
        config: the model's architecture, exportable as the adapter's family.
        adapter: the target family.
        hf: the ``config.json`` written next to the tensors (:func:`hf_config`).

    Returns:
        HF key -> tensor; per-expert matrices are (F, D) / (D, F) views of the banks.

    Raises:
        ConfigError: the router carries a non-zero selection bias the family cannot store.
    """
    adapter.check_exportable(config)
    out = {theirs: (fn(state[ours], True) if fn else state[ours]) for ours, theirs, fn in adapter.key_pairs(config, hf)}
    biased: list[int] = []
    for i in range(config.n_layers):
        if not config.is_moe_layer(i):
            continue
        if not adapter.stores_selection_bias and bool(state[f"blocks.{i}.ffn.router.selection_bias"].any()):
            biased.append(i)
        for bank in BANKS:
            for expert, matrix in enumerate(state[f"blocks.{i}.ffn.experts.{bank}"].unbind(0)):
                out[f"model.layers.{i}.mlp.experts.{expert}.{bank}.weight"] = matrix
    if biased:
        raise ConfigError(
            f"router selection_bias is non-zero in layers {biased} (trained with moe.bias_update_rate > 0): "
            f"{adapter.model_type} routes without a bias; export as a family with a correction bias "
            f"({', '.join(a.model_type for a in export_adapters() if a.stores_selection_bias)}) or train with "
            "bias_update_rate: 0"
        )
    return out


def from_hf_state_dict(
    tensors: dict[str, Tensor], config: TransformerConfig, adapter: HFAdapter, hf: dict[str, Any]
) -> dict[str, Tensor]:
    """HF checkpoint tensors as our ``Transformer`` state dict (inverse of :func:`to_hf_state_dict`).

    Accepts routed experts per expert (released checkpoints) or fused (``mlp.experts.gate_up_proj`` (E, 2F, D),
    ``mlp.experts.down_proj`` (E, D, F), written by ``save_pretrained(save_original_format=False)``).

    Raises:
        ConfigError: tensors are missing or left over, naming them.
    """
    remaining = dict(tensors)
    missing: list[str] = []

    def take(key: str) -> Tensor | None:
        if key not in remaining:
            missing.append(key)
            return None
        return remaining.pop(key)

    state: dict[str, Tensor] = {}
    for ours, theirs, fn in adapter.key_pairs(config, hf):
        tensor = take(theirs)
        if tensor is not None:
            state[ours] = fn(tensor, False) if fn else tensor
    moe = config.moe
    for i in range(config.n_layers):
        if not config.is_moe_layer(i):
            continue
        assert moe is not None
        prefix = f"model.layers.{i}.mlp.experts"
        if f"{prefix}.gate_up_proj" in remaining:
            gate_up = remaining.pop(f"{prefix}.gate_up_proj")
            state[f"blocks.{i}.ffn.experts.gate_proj"], state[f"blocks.{i}.ffn.experts.up_proj"] = gate_up.chunk(2, 1)
            state[f"blocks.{i}.ffn.experts.down_proj"] = take(f"{prefix}.down_proj")
        else:
            for bank in BANKS:
                matrices = [take(f"{prefix}.{e}.{bank}.weight") for e in range(moe.num_experts)]
                if all(m is not None for m in matrices):
                    state[f"blocks.{i}.ffn.experts.{bank}"] = torch.stack(matrices)
        if not adapter.stores_selection_bias:
            state[f"blocks.{i}.ffn.router.selection_bias"] = torch.zeros(moe.num_experts)
    if config.tie_embeddings:
        remaining.pop("lm_head.weight", None)
        if "embed.weight" in state:
            state["lm_head.weight"] = state["embed.weight"]
    # Layers past num_hidden_layers (multi-token-prediction heads) are not part of the LM forward pass.
    leftover = [k for k in remaining if not k.startswith(f"model.layers.{config.n_layers}.")]
    if missing or leftover:
        raise ConfigError(
            f"checkpoint tensors do not match {adapter.model_type} with this config.json: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {leftover[:8]}{'...' if len(leftover) > 8 else ''}"
        )
    return state


def export_model(
    model: Transformer,
    out_dir: str | Path,
    arch: str | None = None,
    tokenizer: str | Path | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> HFExport:
    """Write ``model`` (plain expert banks; merge SD-MoE first) as a transformers checkpoint directory.

    Args:
        model: the model to export; its parameters' dtype is kept.
        out_dir: created if missing; receives config.json, safetensors weights and tokenizer files.
        arch: target family (``model_type``); None picks the one that matches ``model.config`` exactly.
        tokenizer: tokenizer.json file or tokenizer directory to copy, or None. Its end-of-document token (see
            ``EOS_CANDIDATES``) becomes ``eos_token_id`` of config.json and generation_config.json, where
            transformers' generation stops.
        max_shard_size: largest weight file, e.g. ``"2GB"``.
        overwrite: ``out_dir`` may hold an earlier export: its weights, index, config and tokenizer files are
            removed once this model is known to be exportable (other files stay). Without it a directory
            that is not empty is refused.

    Returns:
        The family written and the settings converted on the way.

    Raises:
        ConfigError: the model cannot be expressed exactly in ``arch`` (every differing setting listed), or
            ``out_dir`` is not empty and ``overwrite`` is not set.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    if overwrite and tokenizer is not None and _tokenizer_dir(tokenizer) == out.resolve():
        raise ConfigError(
            f"--tokenizer={str(tokenizer)!r} lies in the output directory, whose tokenizer files --overwrite "
            "removes; give the run's data.corpus.tokenizer instead"
        )
    config = model.config
    adapter = export_adapter(config, arch)
    settings = hf_config(config, adapter, dtype=model.embed.weight.dtype)
    if decoupled_banks(model):
        raise ConfigError("the model's experts are SD-MoE decoupled; call merge_spectral_decoupling(model) first")
    tensors = to_hf_state_dict(model.state_dict(), config, adapter, settings)
    clear_owned_files(out, EXPORT_FILES, owns_shards=True)
    save_safetensors(tensors, out, max_shard_size)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out, config)
        end_of_text = end_of_text_id(out)
        if end_of_text is not None:
            # Without it transformers' generate() never ends a sequence at the end-of-text token: in a batch, a
            # sequence that emitted it decodes on until every other one stops (docs/evaluation.md, "Throughput").
            settings["eos_token_id"] = end_of_text
            write_generation_config(out, end_of_text)
    write_text_atomically(out / CONFIG_FILE, json.dumps(settings, indent=2) + "\n")
    return HFExport(adapter.model_type, adapter.model_class, adapter.conversion_notes(config))


def _tokenizer_dir(tokenizer: str | Path) -> Path:
    source = Path(tokenizer).expanduser().resolve()
    return source if source.is_dir() else source.parent


def import_model(hf_dir: str | Path, upcycle_experts: int | None = None, upcycle_top_k: int = 2) -> Transformer:
    """Our fp32 :class:`Transformer` holding the weights of a transformers checkpoint directory.

    Args:
        hf_dir: directory with config.json and safetensors weights.
        upcycle_experts: for a dense checkpoint (qwen2, qwen3), turn every MLP into this many identical
            experts (see :mod:`sdmoe_train.interop.hf.upcycle`); None imports the model as it is.
        upcycle_top_k: experts per token of the upcycled layers.

    Raises:
        ConfigError: unsupported architecture or settings (listed), or tensors missing / left over.
    """
    settings = read_hf_config(hf_dir)
    adapter = adapter_for(settings.get("model_type"))
    config = config_from_hf(settings, Path(hf_dir) / CONFIG_FILE)
    state = from_hf_state_dict(load_safetensors(Path(hf_dir)), config, adapter, settings)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if upcycle_experts is None:
        return model
    return upcycle_dense_model(model, upcycle_experts, upcycle_top_k)
