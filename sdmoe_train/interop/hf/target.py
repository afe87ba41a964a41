"""The output directory of ``export`` and ``import``: refused when it holds anything, unless overwriting.

Writing into a directory that already holds a checkpoint mixes two checkpoints: an earlier export's
shards and index stay beside a new single ``model.safetensors`` (``import`` and transformers then read the
old weights through the index), and an earlier tokenizer stays beside a model it was not exported with.
So a directory that is not empty is refused, and with ``overwrite`` only the files this package writes
(and the temporary files of an interrupted write) are removed before the new ones are written; anything
else the user keeps there stays untouched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdmoe_train.errors import ConfigError
from sdmoe_train.io import fsync_path

_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# A temporary sibling of an atomic write (sdmoe_train.io.atomic_path) left by a crash: ".NAME.<random>.tmp".
_ATOMIC_TEMP = re.compile(r"\.(?P<name>.+)\.[^.]+\.tmp")


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(out_dir: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuses an output path under a file or not writable, or a directory that is not empty without ``overwrite``.

    Raises:
        ConfigError: naming the path, what it holds and how to proceed.
    """
    existing = next(path for path in (out_dir, *out_dir.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"output directory {str(out_dir)!r}: {str(existing)!r} is a file; give a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {str(out_dir)!r}: {str(existing)!r} is not writable; choose another")
    if overwrite or existing != out_dir:
        return
    present = sorted(entry.name for entry in out_dir.iterdir())
    if present:
        raise ConfigError(
            f"output directory {str(out_dir)!r} is not empty (it holds {_describe(present)}); choose an empty or "
            f"new directory, or pass {flag} to replace an earlier export there (only the checkpoint, index, "
            "config and tokenizer files are removed; other files stay)"
        )


def clear_owned_files(out_dir: Path, owned_names: frozenset[str], owns_shards: bool = False) -> list[str]:
    """Removes the files of an earlier export or import in ``out_dir``; returns their names.

    ``config.json`` goes first, so a directory whose clearing or rewriting is interrupted is refused by
    ``import`` as incomplete instead of pairing a config with weights that are gone.

    Args:
        out_dir: the output directory (may not exist).
        owned_names: the file names this package writes there.
        owns_shards: also remove ``model-NNNNN-of-NNNNN.safetensors`` shards.
    """
    if not out_dir.is_dir():
        return []

    def owned(name: str) -> bool:
        temp = _ATOMIC_TEMP.fullmatch(name)
        name = temp.group("name") if temp else name
        return name in owned_names or (owns_shards and _SHARD.fullmatch(name) is not None)

    removed = sorted(
        (entry for entry in out_dir.iterdir() if entry.is_file() and owned(entry.name)),
        key=lambda entry: (entry.name != "config.json", entry.name),
    )
    for entry in removed:
        entry.unlink()
    if removed:
        fsync_path(out_dir)
    return [entry.name for entry in removed]
