"""The ``sdmoe-train`` console script: one module per subcommand, dispatched from one table.

``fit``, ``validate`` and ``test`` go to LightningCLI (:mod:`.fit`), which also answers ``--help`` with the
other subcommands listed in its epilog; every other subcommand is a row of :data:`SUBCOMMANDS`, a module
of this package with ``run(argv)`` and ``USAGE``. A subcommand's module is imported only when it runs, so
the light ones (``requeue``, which a Slurm batch shell calls inside the preemption window) do not pay for
importing torch and Lightning. Bad user input anywhere (a :class:`~sdmoe_train.errors.ConfigError`) ends
with its message and exit code 2, a halted run (:class:`~sdmoe_train.errors.TrainingHaltedError`) with exit
code 1, never with a traceback.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType

from sdmoe_train.errors import ConfigError, TrainingHaltedError


@dataclass(frozen=True)
class Subcommand:
    """One ``sdmoe-train`` subcommand besides LightningCLI's."""

    module: str
    """Its module in this package: ``run(argv)`` runs it, ``USAGE`` describes it for ``--help``."""
    group: str
    """Heading it is listed under in ``sdmoe-train --help``."""

    def load(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.module}")


SUBCOMMANDS: dict[str, Subcommand] = {
    "prepare": Subcommand("prepare", "data preparation"),
    "demo-corpus": Subcommand("demo_corpus", "data preparation"),
    "kjv-corpus": Subcommand("kjv_corpus", "data preparation"),
    "presets": Subcommand("presets", "architectures"),
    "export": Subcommand("hf_export", "Hugging Face checkpoints"),
    "import": Subcommand("hf_import", "Hugging Face checkpoints"),
    "ssmoe-eval": Subcommand("ssmoe_eval", "SSMoE evaluation"),
    "report": Subcommand("report", "dashboards"),
    "consolidate": Subcommand("consolidate", "checkpoints"),
    "requeue": Subcommand("requeue", "Slurm"),
}
"""Every subcommand that is not LightningCLI's ``fit|validate|test``, in ``--help`` order."""


def usage_epilog() -> str:
    """The ``--help`` epilog: every subcommand of :data:`SUBCOMMANDS`, grouped under its heading."""
    groups: dict[str, list[str]] = {}
    for command in SUBCOMMANDS.values():
        groups.setdefault(command.group, []).append(command.load().USAGE)
    return "".join(f"{group}:\n" + "".join(usages) for group, usages in groups.items())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``argv`` None reads the command line."""
    arguments = sys.argv[1:] if argv is None else argv
    command = SUBCOMMANDS.get(arguments[0]) if arguments else None
    try:
        if command is not None:
            command.load().run(arguments[1:])
        else:
            from sdmoe_train.cli import fit  # LightningCLI, and everything it builds, only when it runs

            fit.run(argv, usage_epilog())
    except ConfigError as error:
        # Bad user input gets its message, not a traceback through Lightning internals.
        print(f"sdmoe-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except TrainingHaltedError as error:
        print(f"sdmoe-train: training stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from error
