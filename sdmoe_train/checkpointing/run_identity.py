"""What a checkpoint must share with the run resuming it: model architecture, SD-MoE layout, tokenizer.

A resumed run rebuilds the model from its own recipe and then loads the checkpoint's tensors, so a
changed recipe either fails deep inside ``load_state_dict`` with a shape error or, worse, loads and
trains on silently different token ids. :func:`check_resume_compatibility` runs before any tensor is
loaded and lists every difference. Optimizer, schedule, data files and trainer settings may change on
resume (a longer run, a lower learning rate) and are not compared, nor are SD-MoE settings that do not
change the model's tensors (see ``SDMOE_LAYOUT_FIELDS``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sdmoe_train.errors import ConfigError

IDENTITY_KEY = "run_identity"
"""Entry of ``checkpoint["sdmoe_train"]`` holding :func:`run_identity`."""


def run_identity(arch: Any, sdmoe: Any, datamodule: Any | None) -> dict[str, Any]:
    """The settings a resumed run must match, as plain data.

    Args:
        arch: The model's ``TransformerConfig``.
        sdmoe: Its ``SDMoEConfig``.
        datamodule: The trainer's data module; its ``tokenizer_identity`` is included when it has one.

    Returns:
        ``{"arch": {...}, "sdmoe": {...}, "tokenizer": {"vocab_size", "sha256"}}`` (tokenizer only when known).
    """
    identity: dict[str, Any] = {"arch": _plain(arch), "sdmoe": _sdmoe_layout(sdmoe)}
    tokenizer = getattr(datamodule, "tokenizer_identity", None)
    if tokenizer is not None:
        identity["tokenizer"] = tokenizer
    return identity


def check_resume_compatibility(checkpoint: dict[str, Any], current: dict[str, Any], path: Any) -> None:
    """Raises if the checkpoint was written by a run with another model or tokenizer.

    Checkpoints written before identities were recorded are compared on their ``arch`` and ``sdmoe``
    hyper-parameters.

    Args:
        checkpoint: The loaded checkpoint.
        current: :func:`run_identity` of the resuming run.
        path: The checkpoint path, for the message.

    Raises:
        ConfigError: Listing every differing setting with the checkpoint's and the recipe's value.
    """
    if not isinstance(checkpoint, dict):
        raise ConfigError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not a training checkpoint: it was not written by "
            "sdmoe-train fit; resume from a checkpoint of this run, or start from weights with model.init_from"
        )
    saved = checkpoint.get("sdmoe_train", {}).get(IDENTITY_KEY)
    if saved is None:
        hparams = checkpoint.get("hyper_parameters") or {}
        if "arch" not in hparams:
            raise ConfigError(
                f"checkpoint {path} has no model architecture ('arch' hyper-parameter): it was not written by "
                "sdmoe-train fit; resume from a checkpoint of this run, or start from weights with model.init_from"
            )
        saved = {"arch": _plain(hparams["arch"]), "sdmoe": _sdmoe_layout(hparams.get("sdmoe"))}
    differences = identity_differences(saved, current)
    if differences:
        raise ConfigError(
            f"cannot resume from {path}: the recipe differs from the run that wrote it in "
            f"{len(differences)} setting(s):\n  " + "\n  ".join(differences) + "\nresume with the original "
            "model and tokenizer settings, or start a new run (new checkpoint directory, or model.init_from to "
            "reuse only the weights)"
        )


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"<setting>: checkpoint <old> != recipe <new>"`` for every setting two run identities disagree on.

    Sections (``arch``, ``sdmoe``, ``tokenizer``) missing from either identity are not compared.
    """
    return [
        f"{key}: checkpoint {old!r} != recipe {new!r}"
        for section in ("arch", "sdmoe", "tokenizer")
        if section in saved and section in current
        for key, old, new in _differences(saved[section], current[section], section)
    ]


SDMOE_LAYOUT_FIELDS = ("enabled", "rank", "matrices")
"""SD-MoE settings that decide which tensors exist; refresh interval, strictness, SVD method and seed
only steer training and may change on resume (the seed only matters for a fresh initialisation)."""


def _sdmoe_layout(sdmoe: Any) -> dict[str, Any] | None:
    settings = _plain(sdmoe)
    if not isinstance(settings, dict):
        return None
    return {name: settings.get(name) for name in SDMOE_LAYOUT_FIELDS}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _differences(old: Any, new: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            difference
            for key in sorted(set(old) | set(new), key=str)
            for difference in _differences(old.get(key), new.get(key), f"{prefix}.{key}")
        ]
    if isinstance(old, tuple | list) and isinstance(new, tuple | list):
        old, new = list(old), list(new)
    return [] if old == new else [(prefix, old, new)]
