"""Imports point one way, and no module imports itself back.

Every ``import`` of every module of ``sdmoe_train`` counts, wherever it stands: at module level, inside a
function, or under ``if TYPE_CHECKING``. The layers, lowest first:

    errors, config_checks,       anyone may import them
    signals
    io                           atomic file writes
    moe                          routing, dispatch, expert banks, SD-MoE and SSMoE algebra
    models                       the transformer built from moe/ blocks
    parallel                     expert parallelism, DeepSpeed (the only torch.distributed / deepspeed user)
    checkpointing                checkpoint files, resume, preemption; holds Lightning *callbacks*, so it
                                 sits below lightning/, which re-exports them for recipes
    lightning                    PretrainModule, optimizer, monitors
    cli                          the console script (may import anything)

and beside them: data (tokenizers, caches, the data module: io and parallel's object gather only),
report (the dashboard; the figures file and SVG helpers it owns are what lightning/ uses, so report/
never imports lightning/), interop (Hugging Face: models, moe, data's tokenizer and checkpointing's
model-state layout), evaluation (lm-evaluation-harness: the lm-eval model over models/, task lookup, the
offline task builder over data's held-out texts; below lightning/, whose DownstreamEvaluation callback
runs it).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import sdmoe_train

PACKAGE_ROOT = Path(sdmoe_train.__file__).parent
BASE = {"errors", "config_checks", "signals"}

ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config_checks": {"errors"},
    "signals": set(),
    "io": BASE,
    "moe": BASE | {"io"},
    "models": BASE | {"io", "moe"},
    "parallel": BASE | {"io", "moe", "models"},
    "data": BASE | {"io", "parallel"},
    "report": BASE | {"io"},
    "checkpointing": BASE | {"io", "moe", "models", "parallel"},
    "interop": BASE | {"io", "moe", "models", "data", "checkpointing"},
    "evaluation": BASE | {"io", "moe", "models", "parallel", "data"},
    "lightning": BASE | {"io", "moe", "models", "parallel", "data", "checkpointing", "report", "evaluation"},
    "cli": BASE
    | {"io", "moe", "models", "parallel", "data", "report", "checkpointing", "interop", "evaluation", "lightning"},
}
"""Layer -> the layers its modules may import (besides its own)."""

THIRD_PARTY_ONLY_IN: dict[str, set[str]] = {
    "torch.distributed": {"parallel"},
    "deepspeed": {"parallel"},
    "lightning": {"data", "parallel", "checkpointing", "lightning", "cli"},
}
"""Third-party packages -> the only layers that may import them (moe/ and models/ import none of these)."""


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``sdmoe_train.moe.sdmoe`` -> ``moe``; the package itself is its own layer ``sdmoe_train``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """Every module ``module``'s source imports (absolute names; a ``from X import y`` of a submodule y is X.y)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Module -> every module it imports (ours and third-party), for all modules under ``root``."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    return {
        module: set(imported_modules(path.read_text(), module, path.name == "__init__.py", known))
        for module, path in files.items()
    }


def layer_violations(graph: dict[str, set[str]], package: str = "sdmoe_train") -> list[str]:
    problems = []
    for module, imports in sorted(graph.items()):
        layer = layer_of(module)
        for target in sorted(imports):
            if target.split(".")[0] == package:
                target_layer = layer_of(target)
                if target_layer != layer and target_layer not in ALLOWED.get(layer, set()):
                    problems.append(f"{module} imports {target}: {layer}/ may not import {target_layer}/")
                continue
            for third_party, layers in THIRD_PARTY_ONLY_IN.items():
                if (target == third_party or target.startswith(third_party + ".")) and layer not in layers:
                    problems.append(f"{module} imports {target}: only {sorted(layers)} may import {third_party}")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of our modules that import each other, directly or through others (Tarjan)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowlink[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                lowlink[module] = min(lowlink[module], lowlink[target])
            elif target in stack:
                lowlink[module] = min(lowlink[module], index[target])
        if lowlink[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1 or module in graph[module]:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_every_layer_of_the_package_is_named_in_the_rules() -> None:
    layers = {layer_of(module) for module in import_graph()} - {"sdmoe_train"}
    assert layers == set(ALLOWED), "a new top-level module or package needs its row in ALLOWED"


def test_no_module_imports_against_the_layer_order() -> None:
    assert layer_violations(import_graph()) == []


def test_no_import_cycles() -> None:
    assert import_cycles(import_graph()) == []


def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    root = tmp_path / "sdmoe_train"
    for name, source in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    return import_graph(root)


@pytest.mark.parametrize(
    "source",
    [
        "from sdmoe_train.models.transformer import Transformer\n",
        "def build():\n    from sdmoe_train.models import transformer\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..models.transformer import Transformer\n",
        "import torch.distributed as dist\n",
    ],
    ids=["module_level", "function_level", "type_checking_relative", "torch_distributed"],
)
def test_the_checker_sees_every_kind_of_import_against_the_order(tmp_path: Path, source: str) -> None:
    graph = _fake_package(
        tmp_path,
        {"moe/__init__.py": "", "moe/layer.py": source, "models/__init__.py": "", "models/transformer.py": ""},
    )
    (problem,) = layer_violations(graph)
    assert problem.startswith("sdmoe_train.moe.layer imports ")


def test_the_checker_finds_a_cycle_between_two_modules(tmp_path: Path) -> None:
    graph = _fake_package(
        tmp_path,
        {
            "moe/__init__.py": "",
            "moe/ssmoe_router.py": "from sdmoe_train.moe.ssmoe_rows import build\n",
            "moe/ssmoe_rows.py": "def build():\n    from sdmoe_train.moe import ssmoe_router\n",
        },
    )
    assert import_cycles(graph) == [["sdmoe_train.moe.ssmoe_router", "sdmoe_train.moe.ssmoe_rows"]]
