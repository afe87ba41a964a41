"""Integration-test fixtures."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _isolated_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when pytest's own argv is present next to explicit ``args``."""
    monkeypatch.setattr(sys, "argv", ["sdmoe-train"])
