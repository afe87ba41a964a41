"""Finding lm-eval tasks: the project's shipped offline tasks, the user's ``include_path``, lm-eval's own.

Indexing lm-eval's ~15 000 bundled task definitions takes seconds (tens of seconds on a busy machine), so
:func:`resolve_tasks` first looks only in the local directories (the shipped ``eval_tasks/`` and every
``include_path``) and indexes the bundled tasks only when a name is not found there. Bundled tasks read their
data from the Hugging Face hub; a failure to reach it becomes a :class:`ConfigError` that says so.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager
from lm_eval.utils import pattern_match

from sdmoe_train.errors import ConfigError

SHIPPED_TASKS_DIR = Path(__file__).resolve().parents[2] / "eval_tasks"
"""Offline tasks committed with the project (``eval_tasks/`` of a source checkout)."""


@dataclass
class ResolvedTasks:
    """Task names expanded from the user's list, and the task manager that knows them."""

    names: list[str]
    """Task, group or tag names (globs expanded) and YAML paths, in the order given."""
    manager: TaskManager
    """Index of the local directories, plus lm-eval's bundled tasks when a name needed them."""
    local: bool
    """Whether every name was found in the local directories (no network needed to load them)."""


def task_directories(include_path: list[str] | None) -> list[Path]:
    """The shipped task directory (when present) followed by the user's ``include_path`` directories.

    Raises:
        ConfigError: If an ``include_path`` entry is not a directory.
    """
    directories = [SHIPPED_TASKS_DIR] if SHIPPED_TASKS_DIR.is_dir() else []
    for entry in include_path or []:
        path = Path(entry).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--include_path={entry!r} is not a directory of lm-eval task YAML files")
        directories.append(path)
    return directories


def resolve_tasks(requested: list[str], include_path: list[str] | None = None) -> ResolvedTasks:
    """Expands task names (and glob patterns) against the local task directories, then lm-eval's own.

    Args:
        requested: task, group or tag names, glob patterns (``shakespeare_*``) or paths of task YAML files.
        include_path: extra directories of task YAML files.

    Returns:
        The expanded names and the task manager to load them with.

    Raises:
        ConfigError: If the list is empty or a name matches no task, naming close matches and the local tasks.
    """
    if not requested:
        raise ConfigError("--tasks is empty; name at least one task (e.g. --tasks shakespeare)")
    directories = task_directories(include_path)
    local = TaskManager(include_path=[str(path) for path in directories], include_defaults=False)
    names = _expand(requested, local)
    if names is not None:
        return ResolvedTasks(names, local, local=True)
    bundled = _bundled_manager(tuple(str(path) for path in directories))
    names = _expand(requested, bundled)
    if names is None:
        unknown = [name for name in requested if not _matches(name, bundled)]
        raise ConfigError(_unknown_tasks_message(unknown, bundled, local, directories))
    return ResolvedTasks(names, bundled, local=False)


@functools.lru_cache(maxsize=4)
def _bundled_manager(directories: tuple[str, ...]) -> TaskManager:
    """lm-eval's bundled tasks plus the local directories, indexed once per process (it takes seconds)."""
    return TaskManager(include_path=list(directories) or None)


def load_tasks(resolved: ResolvedTasks) -> dict[str, Any]:
    """Builds the task objects (reading their datasets), as ``TaskManager.load`` returns them.

    Raises:
        ConfigError: If a dataset cannot be read, e.g. a bundled task's hub dataset without network access.
    """
    try:
        return resolved.manager.load(resolved.names)
    except Exception as error:  # datasets/huggingface_hub raise many types for an unreachable or missing dataset
        where = (
            "their local data files"
            if resolved.local
            else "their datasets (lm-eval's bundled tasks download them from the Hugging Face hub, which needs "
            "network access or a filled HF_DATASETS_CACHE)"
        )
        raise ConfigError(
            f"could not load the tasks {resolved.names}: reading {where} failed with {type(error).__name__}: "
            f"{error}. Offline, use the shipped tasks ({SHIPPED_TASKS_DIR}) or your own via --include_path"
        ) from error


def _matches(name: str, manager: TaskManager) -> list[str]:
    if name in manager.all_tasks:
        return [name]
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return [name]
    return pattern_match([name], manager.all_tasks) if any(char in name for char in "*?[") else []


def _expand(requested: list[str], manager: TaskManager) -> list[str] | None:
    names: list[str] = []
    for name in requested:
        matches = _matches(name, manager)
        if not matches:
            return None
        names.extend(match for match in matches if match not in names)
    return names


def _unknown_tasks_message(
    unknown: list[str], bundled: TaskManager, local: TaskManager, directories: list[Path]
) -> str:
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name, bundled.all_tasks, n=5, cutoff=0.6)
        lines.append(f"{name!r}" + (f" (close matches: {', '.join(close)})" if close else ""))
    searched = ", ".join(str(path) for path in directories) or "none"
    return (
        f"unknown task(s): {'; '.join(lines)}. Local tasks ({searched}): {', '.join(local.all_tasks) or 'none'}. "
        "Add a directory of task YAML files with --include_path DIR; lm-eval's bundled tasks (arc_easy, "
        "hellaswag, ...) are known by name and need network access to download their data"
    )
