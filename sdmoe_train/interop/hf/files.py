"""Reading and writing Hugging Face checkpoint directories: config.json, sharded safetensors, tokenizer files.

The tensor and setting correspondence lives in the family adapters (:mod:`sdmoe_train.interop.hf.families`)
and the driver that applies them (:mod:`sdmoe_train.interop.hf.driver`); this file only moves bytes, every
write atomic. ``safetensors`` is needed at runtime; ``transformers`` is not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from torch import Tensor

from sdmoe_train.data.tokenizer import EOS_CANDIDATES, load_tokenizer
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import atomic_path, copy_file_atomically, write_text_atomically
from sdmoe_train.models.config import TransformerConfig

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
EXPORT_FILES = frozenset({CONFIG_FILE, GENERATION_CONFIG_FILE, SINGLE_FILE, INDEX_FILE, *TOKENIZER_FILES})
"""Files an export writes (besides numbered shards), which ``export --overwrite`` removes before writing."""
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
    """Every tensor of a checkpoint directory (single file or sharded with an index).

    Raises:
        ConfigError: no weights, an unreadable index, or a weight file that is missing, truncated or not
            safetensors, naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (hf_dir / INDEX_FILE).is_file():
        weight_map = _read_json(hf_dir / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(
                f"{hf_dir / INDEX_FILE} has no 'weight_map' (tensor name -> shard file); re-download or re-export "
                "the checkpoint"
            )
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ConfigError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found (is it a safetensors checkpoint?)")
    missing = [name for name in files if not (hf_dir / name).is_file()]
    if missing:
        raise ConfigError(
            f"{hf_dir / INDEX_FILE} lists weight files that are missing: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; the download or copy is incomplete, fetch those files again"
        )
    tensors: dict[str, Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(hf_dir / name)))
        except (SafetensorError, OSError) as error:
            raise ConfigError(
                f"{hf_dir / name} is truncated or not a safetensors file ({error}); fetch or export it again"
            ) from error
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
        tokenizer = load_tokenizer(out_dir / "tokenizer.json")
        settings: dict[str, object] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.max_seq_len,
        }
        eos = _end_of_text_token(tokenizer)
        if eos is not None:
            settings["eos_token"] = eos
        write_text_atomically(out_dir / "tokenizer_config.json", json.dumps(settings, indent=2) + "\n")
        copied.append(out_dir / "tokenizer_config.json")
    return [Path(p) for p in copied]


def end_of_text_id(hf_dir: Path) -> int | None:
    """Id of the end-of-document token of a checkpoint directory's tokenizer.json; None without either."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = load_tokenizer(path)
    eos = _end_of_text_token(tokenizer)
    return None if eos is None else tokenizer.token_to_id(eos)


def write_generation_config(hf_dir: Path, eos_token_id: int) -> Path:
    """Write generation_config.json: greedy and sampled generation end a sequence at ``eos_token_id``, which also
    pads the sequences of a batch that ended early (as Qwen's checkpoints do)."""
    settings = {"eos_token_id": eos_token_id, "pad_token_id": eos_token_id}
    path = hf_dir / GENERATION_CONFIG_FILE
    write_text_atomically(path, json.dumps(settings, indent=2) + "\n")
    return path


def _end_of_text_token(tokenizer: Tokenizer) -> str | None:
    return next((token for token in EOS_CANDIDATES if tokenizer.token_to_id(token) is not None), None)


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory.

    Raises:
        ConfigError: no config.json, or one that is not a JSON object, naming the file.
    """
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no {CONFIG_FILE}; expected a Hugging Face checkpoint directory")
    return _read_json(path)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a checkpoint directory, or a ConfigError naming the file and the damage."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); re-download or re-export the checkpoint") from error
    if not isinstance(settings, dict):
        raise ConfigError(f"{path} holds a {type(settings).__name__}, not a JSON object; is it the right file?")
    return settings
