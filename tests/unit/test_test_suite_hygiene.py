"""The test suite's own rules (docs/design/test-strength.md): every test can fail, and says what it expects.

A test function must contain a check: an ``assert``, ``pytest.raises``/``pytest.warns``/``pytest.fail``,
an ``assert_*`` call (``torch.testing.assert_close``, ``mock.assert_called_once``), or a call to a helper
defined under tests/ that contains one. A test whose whole point is that a valid input is not refused says
so by its name ending in ``_pass``, ``_passes`` or ``_accepted``. ``pytest.raises(Exception)`` is refused:
it passes on any error, including one the test did not mean.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
PYTEST_CHECKS = {"raises", "warns", "fail", "deprecated_call"}
NO_RAISE_SUFFIXES = ("_pass", "_passes", "_accepted")


@functools.cache
def _modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), filename=str(path)) for path in sorted(TESTS.rglob("*.py"))}


def _called_name(call: ast.Call) -> str:
    function = call.func
    if isinstance(function, ast.Attribute):
        return function.attr
    return function.id if isinstance(function, ast.Name) else ""


def _functions(modules: dict[Path, ast.Module]) -> Iterator[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for path, module in modules.items():
        for node in ast.walk(module):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def _checks(function: ast.AST, helpers: set[str], *, count_raise: bool) -> bool:
    for node in ast.walk(function):
        if isinstance(node, ast.Assert) or (count_raise and isinstance(node, ast.Raise)):
            return True
        if isinstance(node, ast.Call):
            name = _called_name(node)
            if name in PYTEST_CHECKS or name.startswith("assert") or name in helpers:
                return True
    return False


def _checking_helpers(modules: dict[Path, ast.Module]) -> set[str]:
    """Names of the non-test functions under tests/ that check something, directly or through each other."""
    candidates = [function for _, function in _functions(modules) if not function.name.startswith("test_")]
    helpers: set[str] = set()
    while True:
        found = {function.name for function in candidates if _checks(function, helpers, count_raise=True)}
        if found <= helpers:
            return helpers
        helpers |= found


def _unchecked_tests(modules: dict[Path, ast.Module]) -> list[str]:
    helpers = _checking_helpers(modules)
    return [
        f"{path.relative_to(TESTS.parent)}:{function.lineno} {function.name}"
        for path, function in _functions(modules)
        if function.name.startswith("test_")
        and not function.name.endswith(NO_RAISE_SUFFIXES)
        and not _checks(function, helpers, count_raise=False)
    ]


def _broad_raises(modules: dict[Path, ast.Module]) -> list[str]:
    return [
        f"{path.relative_to(TESTS.parent)}:{node.lineno}"
        for path, module in modules.items()
        for node in ast.walk(module)
        if isinstance(node, ast.Call)
        and _called_name(node) == "raises"
        and node.args
        and ast.unparse(node.args[0]) in {"Exception", "BaseException"}
    ]


def test_every_test_function_checks_something() -> None:
    unchecked = _unchecked_tests(_modules())
    assert unchecked == [], "test functions without a check (see this module's docstring):\n" + "\n".join(unchecked)


def test_no_test_expects_just_any_exception() -> None:
    broad = _broad_raises(_modules())
    assert broad == [], "pytest.raises(Exception) passes on any error; name the class and match= its message:\n" + (
        "\n".join(broad)
    )


def test_the_rules_flag_a_test_without_a_check_and_a_broad_raises() -> None:
    source = (
        "def helper(x):\n    assert x\n"
        "def indirect(x):\n    helper(x)\n"
        "def test_runs():\n    build()\n"
        "def test_uses_a_helper():\n    indirect(build())\n"
        "def test_refuses():\n    with pytest.raises(ConfigError, match='bad'):\n        build()\n"
        "def test_compares():\n    torch.testing.assert_close(build(), 1.0)\n"
        "def test_defaults_pass():\n    build()\n"
        "def test_broad():\n    with pytest.raises(Exception):\n        build()\n"
    )
    modules = {TESTS / "example.py": ast.parse(source)}
    assert _unchecked_tests(modules) == ["tests/example.py:5 test_runs"]
    assert _broad_raises(modules) == ["tests/example.py:17"]
