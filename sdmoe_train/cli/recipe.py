"""Parsers for subcommands that read a training recipe but use only its ``data`` section.

``sdmoe-train prepare`` and ``sdmoe-train ssmoe-eval`` take the same ``--config`` file as ``fit``; the
sections and top-level options they do not use are accepted and ignored, so one recipe (or the
``config.yaml`` a run saves) serves every subcommand.
"""

from __future__ import annotations

from collections.abc import Iterable

from jsonargparse import ActionConfigFile, ArgumentParser

from sdmoe_train.data import PretrainDataModule

_FIT_OPTIONS: dict[str, tuple[object, object]] = {
    "model": (dict | None, None),
    "trainer": (dict | None, None),
    "optimizer": (dict | None, None),
    "lr_scheduler": (dict | None, None),
    "seed_everything": (bool | int, True),
    "ckpt_path": (str | None, None),
    "validate_before_fit": (bool, True),
    "auto_resume": (bool, True),
}
"""Top-level keys of a `fit` recipe besides ``data``, with their types and defaults."""


def recipe_data_parser(prog: str, description: str, own_options: Iterable[str] = ()) -> ArgumentParser:
    """A parser with ``--config RECIPE.yaml``, the recipe's ``data`` section, and the rest accepted and ignored.

    Args:
        prog: the subcommand as typed, e.g. ``sdmoe-train prepare``.
        description: one line for ``--help``.
        own_options: top-level keys the caller adds itself with its own meaning (e.g. ``ckpt_path``).
    """
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="recipe YAML (the same file `fit` takes)")
    parser.add_class_arguments(PretrainDataModule, "data")
    skipped = set(own_options)
    for key, (value_type, default) in _FIT_OPTIONS.items():
        if key not in skipped:
            parser.add_argument(f"--{key}", type=value_type, default=default)
    return parser
