"""Loads the jsonl files of the task YAML files in this directory, relative to this file (any working directory).

Written by `sdmoe-train build-eval-tasks`; lm-eval calls it as the tasks' `custom_dataset`.
"""

from pathlib import Path

import datasets


def load_splits(data_files: dict, **_task_metadata):
    here = Path(__file__).resolve().parent
    return datasets.load_dataset("json", data_files={split: str(here / name) for split, name in data_files.items()})
