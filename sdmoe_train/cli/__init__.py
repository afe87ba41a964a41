"""The ``sdmoe-train`` console script: one module per subcommand, dispatched from one table.

``fit``, ``validate`` and ``test`` go to LightningCLI (:mod:`.fit`), which also answers ``--help`` with the
other subcommands listed in its epilog; every other subcommand is a row of :data:`SUBCOMMANDS`. Bad user
input anywhere (a :class:`~sdmoe_train.errors.ConfigError`) ends with its message and exit code 2, a halted
run (:class:`~sdmoe_train.errors.TrainingHaltedError`) with exit code 1, never with a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from sdmoe_train.cli import (
    consolidate,
    demo_corpus,
    fit,
    hf_export,
    hf_import,
    prepare,
    presets,
    report,
    requeue,
    ssmoe_eval,
)
from sdmoe_train.errors import ConfigError, TrainingHaltedError


@dataclass(frozen=True)
class Subcommand:
    """One ``sdmoe-train`` subcommand besides LightningCLI's."""

    run: Callable[[list[str]], object]
    """Runs it with the arguments after its name."""
    group: str
    """Heading it is listed under in ``sdmoe-train --help``."""
    usage: str
    """Its usage and one-line description for ``sdmoe-train --help``."""


SUBCOMMANDS: dict[str, Subcommand] = {
    "prepare": Subcommand(prepare.run, "data preparation", prepare.USAGE),
    "demo-corpus": Subcommand(demo_corpus.run, "data preparation", demo_corpus.USAGE),
    "presets": Subcommand(presets.run, "architectures", presets.USAGE),
    "export": Subcommand(hf_export.run, "Hugging Face checkpoints", hf_export.USAGE),
    "import": Subcommand(hf_import.run, "Hugging Face checkpoints", hf_import.USAGE),
    "ssmoe-eval": Subcommand(ssmoe_eval.run, "SSMoE evaluation", ssmoe_eval.USAGE),
    "report": Subcommand(report.run, "dashboards", report.USAGE),
    "consolidate": Subcommand(consolidate.run, "checkpoints", consolidate.USAGE),
    "requeue": Subcommand(requeue.run, "Slurm", requeue.USAGE),
}
"""Every subcommand that is not LightningCLI's ``fit|validate|test``, in ``--help`` order."""


def usage_epilog() -> str:
    """The ``--help`` epilog: every subcommand of :data:`SUBCOMMANDS`, grouped under its heading."""
    groups: dict[str, list[str]] = {}
    for command in SUBCOMMANDS.values():
        groups.setdefault(command.group, []).append(command.usage)
    return "".join(f"{group}:\n" + "".join(usages) for group, usages in groups.items())


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``argv`` None reads the command line."""
    arguments = sys.argv[1:] if argv is None else argv
    command = SUBCOMMANDS.get(arguments[0]) if arguments else None
    try:
        if command is not None:
            command.run(arguments[1:])
        else:
            fit.run(argv, usage_epilog())
    except ConfigError as error:
        # Bad user input gets its message, not a traceback through Lightning internals.
        print(f"sdmoe-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except TrainingHaltedError as error:
        print(f"sdmoe-train: training stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from error
