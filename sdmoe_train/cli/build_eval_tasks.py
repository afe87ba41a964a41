"""``sdmoe-train build-eval-tasks``: offline lm-eval tasks from the held-out documents of a recipe's corpus.

The tasks (multiple choice on the true last word and the true next line, rolling perplexity) are written by
:mod:`sdmoe_train.evaluation.task_builder`; the same recipe and options always give the same files.
"""

from __future__ import annotations

import dataclasses

from sdmoe_train.cli.outputs import check_output_directory
from sdmoe_train.cli.recipe import recipe_data_parser
from sdmoe_train.data.held_out import split_texts
from sdmoe_train.evaluation.task_builder import TaskBuildConfig, build_tasks

USAGE = """\
  sdmoe-train build-eval-tasks --config RECIPE.yaml --out DIR [--name NAME] [--last_word_items N]
      write offline multiple-choice and perplexity tasks from the recipe's held-out documents
"""


def run(argv: list[str]) -> None:
    """``sdmoe-train build-eval-tasks``: write offline tasks from a recipe's held-out documents."""
    parser = recipe_data_parser(
        "sdmoe-train build-eval-tasks",
        "Write offline lm-eval tasks (next-line multiple choice, rolling perplexity) from a recipe's held-out text.",
    )
    parser.add_argument("--out", type=str, required=True, help="directory for the task YAML and jsonl files")
    parser.add_class_arguments(TaskBuildConfig, None)
    config = parser.parse_args(argv)
    check_output_directory(config.out, "--out")
    parsed = parser.instantiate(config)
    options = TaskBuildConfig(**{field.name: config[field.name] for field in dataclasses.fields(TaskBuildConfig)})
    texts = split_texts(parsed.data.corpus)
    built = build_tasks(texts, options, config.out)
    summaries = [
        f"{summary.task} ({summary.test_items} items + {summary.fewshot_items} few-shot examples; "
        f"{summary.dropped_as_trained} candidates dropped because their answer occurs in training text)"
        for summary in built.choice_tasks
    ]
    summaries.append(
        f"{options.task('perplexity')} ({built.perplexity_docs} documents, {built.perplexity_chars:,} characters)"
    )
    print(f"wrote {len(built.files)} files to {config.out} from {len(texts.validation)} held-out documents:")
    for summary in summaries:
        print(f"  {summary}")
