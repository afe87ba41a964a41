"""Reading and writing Hugging Face checkpoint directories: config.json, sharded safetensors, tokenizer files.

The tensor and setting correspondence lives in :mod:`sdmoe_train.models.hf_export`; this file only moves
bytes. ``safetensors`` is needed at runtime; ``transformers`` is not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.io import atomic_path, copy_file_atomically, write_text_atomically
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.hf_export import HFArchitecture, detect_architecture, hf_config, to_hf_state_dict
from sdmoe_train.models.hf_import import config_from_hf, detect_hf_architecture, from_hf_state_dict, key_layout
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import decoupled_banks

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: an int or a string such as ``"2GB"``, ``"500MB"``, ``"1GiB"`` (decimal units as HF)."""
    if isinstance(size, int):
        value, unit = size, "B"
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
        if match is None:
            raise ConfigError(f"max_shard_size={size!r} is not a size; use e.g. 2GB, 500MB or a byte count")
        value, unit = float(match.group(1)), match.group(2) or "B"
    size_bytes = int(value * _UNITS[unit])
    if size_bytes <= 0:
        raise ConfigError(f"max_shard_size={size!r} must be positive")
    return size_bytes


def save_safetensors(tensors: dict[str, Tensor], out_dir: Path, max_shard_size: str | int = "5GB") -> list[Path]:
    """Write ``tensors`` as ``model.safetensors`` or, above ``max_shard_size``, as shards plus an index.

    A tensor larger than the limit gets a shard of its own. Returns the written weight files.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key in sorted(tensors):
        size = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += size
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, keys in zip(names, shards, strict=True):
        # safetensors refuses tensors that share storage (the per-expert views of one bank); copy per shard.
        with atomic_path(out_dir / name) as temp:
            save_file({k: tensors[k].detach().contiguous().clone() for k in keys}, str(temp), {"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {key: name for name, keys in zip(names, shards, strict=True) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomically(out_dir / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


def load_safetensors(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded with an index)."""
    from safetensors.torch import load_file

    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ConfigError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found (is it a safetensors checkpoint?)")
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


def copy_tokenizer(source: str | Path, out_dir: Path, config: TransformerConfig) -> list[Path]:
    """Copy a tokenizer.json (file, or a directory of HF tokenizer files) into a checkpoint directory.

    A bare tokenizer.json gets a minimal tokenizer_config.json so ``AutoTokenizer`` can load it.
    """
    source = Path(source).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        copied = [
            copy_file_atomically(source / name, out_dir / name) for name in TOKENIZER_FILES if (source / name).is_file()
        ]
        if not copied:
            raise ConfigError(f"--tokenizer={str(source)!r}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) there")
    elif source.is_file():
        copied = [copy_file_atomically(source, out_dir / "tokenizer.json")]
    else:
        raise ConfigError(f"--tokenizer={str(source)!r} does not exist; give a tokenizer.json or its directory")
    if not (out_dir / "tokenizer_config.json").is_file():
        from sdmoe_train.data.tokenizer import EOS_CANDIDATES, load_tokenizer

        tokenizer = load_tokenizer(out_dir / "tokenizer.json")
        settings: dict[str, object] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.max_seq_len,
        }
        eos = next((token for token in EOS_CANDIDATES if tokenizer.token_to_id(token) is not None), None)
        if eos is not None:
            settings["eos_token"] = eos
        write_text_atomically(out_dir / "tokenizer_config.json", json.dumps(settings, indent=2) + "\n")
        copied.append(out_dir / "tokenizer_config.json")
    return [Path(p) for p in copied]


def export_model(
    model: Transformer,
    out_dir: str | Path,
    arch: HFArchitecture | None = None,
    tokenizer: str | Path | None = None,
    max_shard_size: str | int = "5GB",
) -> HFArchitecture:
    """Write ``model`` (plain expert banks; merge SD-MoE first) as a transformers checkpoint directory.

    Args:
        model: the model to export; its parameters' dtype is kept.
        out_dir: created if missing; receives config.json, safetensors weights and tokenizer files.
        arch: target architecture; None picks the one that matches ``model.config`` exactly.
        tokenizer: tokenizer.json file or tokenizer directory to copy, or None.
        max_shard_size: largest weight file, e.g. ``"2GB"``.

    Returns:
        The architecture written.

    Raises:
        ConfigError: the model cannot be expressed exactly in ``arch`` (every differing setting listed).
    """
    config = model.config
    arch = arch or detect_architecture(config)
    settings = hf_config(config, arch, dtype=model.embed.weight.dtype)
    if decoupled_banks(model):
        raise ConfigError("the model's experts are SD-MoE decoupled; call merge_spectral_decoupling(model) first")
    tensors = to_hf_state_dict(model.state_dict(), config, arch)
    out = Path(out_dir)
    save_safetensors(tensors, out, max_shard_size)
    write_text_atomically(out / CONFIG_FILE, json.dumps(settings, indent=2) + "\n")
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out, config)
    return arch


def read_hf_config(hf_dir: str | Path) -> dict:
    """The parsed config.json of a checkpoint directory."""
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no {CONFIG_FILE}; expected a Hugging Face checkpoint directory")
    return json.loads(path.read_text())


def import_model(hf_dir: str | Path, upcycle_experts: int | None = None, upcycle_top_k: int = 2) -> Transformer:
    """Our fp32 :class:`Transformer` holding the weights of a transformers checkpoint directory.

    Args:
        hf_dir: directory with config.json and safetensors weights.
        upcycle_experts: for a dense checkpoint (qwen2, qwen3), turn every MLP into this many identical
            experts (see :mod:`sdmoe_train.moe.upcycle`); None imports the model as it is.
        upcycle_top_k: experts per token of the upcycled layers.

    Raises:
        ConfigError: unsupported architecture or settings (listed), or tensors missing / left over.
    """
    settings = read_hf_config(hf_dir)
    config = config_from_hf(settings)
    state = from_hf_state_dict(load_safetensors(Path(hf_dir)), config, key_layout(detect_hf_architecture(settings)))
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if upcycle_experts is None:
        return model
    from sdmoe_train.moe.upcycle import upcycle_dense_model

    return upcycle_dense_model(model, upcycle_experts, upcycle_top_k)
