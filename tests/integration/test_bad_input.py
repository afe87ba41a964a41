"""Bad input fails fast, before any training step, with exit code 2 and a message naming the problem and fix.

Each case is one :class:`BadInput`: the extra `fit` arguments (or a setup that damages a copy of the
prepared run) and the phrases the error must contain. Add a case by appending to ``BAD_INPUTS``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from sdmoe_train.cli import main
from tests.integration.training_runs import write_tiny_recipe


@dataclass
class Prepared:
    """A prepared recipe whose run already wrote checkpoints (2 steps)."""

    root: Path
    recipe: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "run" / "checkpoints"

    def copy_to(self, destination: Path) -> Path:
        """Copies the run into ``destination`` and returns a recipe pointing there."""
        shutil.copytree(self.root / "run", destination / "run")
        recipe = destination / "recipe.yaml"
        recipe.write_text(self.recipe.read_text().replace(str(self.root / "run"), str(destination / "run")))
        return recipe


@dataclass
class BadInput:
    name: str
    args: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    setup: Callable[[Prepared, Path], list[str]] | None = None
    """Builds damaged files under the case's tmp_path and returns extra arguments (may replace --config)."""


def _corrupt_newest(prepared: Prepared, tmp_path: Path, truncate: bool) -> list[str]:
    recipe = prepared.copy_to(tmp_path)
    newest = tmp_path / "run" / "checkpoints" / "epoch=0-step=2.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if truncate else data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    return ["--config", str(recipe), "--ckpt_path", str(newest)]


def _garbage_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"\x00not what you think\xff" * 10)
    return path


def _other_tokenizer(prepared: Prepared, tmp_path: Path) -> list[str]:
    recipe = prepared.copy_to(tmp_path)
    from tests.corpora import make_documents, make_tokenizer

    path, _ = make_tokenizer(tmp_path / "other", make_documents(count=6, seed=3))
    cache = tmp_path / "other_cache"
    main(["prepare", "--config", str(recipe), f"--data.corpus.tokenizer={path}", f"--data.corpus.cache_dir={cache}"])
    return ["--config", str(recipe), f"--data.corpus.tokenizer={path}", f"--data.corpus.cache_dir={cache}"]


def _empty_documents(prepared: Prepared, tmp_path: Path) -> list[str]:
    for index in range(3):
        (tmp_path / f"empty_{index}.txt").write_text("")
    return [f"--data.corpus.data_files=[{tmp_path}/empty_*.txt]", f"--data.corpus.cache_dir={tmp_path / 'cache'}"]


def _documents_with(tmp_path: Path, name: str, content: bytes, suffix: str) -> list[str]:
    """Four good documents and one bad file ``name`` in a fresh corpus directory, with a fresh cache."""
    from tests.corpora import make_documents

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if suffix == ".txt":
        for index, text in enumerate(make_documents(count=4)):
            (corpus / f"doc_{index}.txt").write_text(text)
    (corpus / name).write_bytes(content)
    return [f"--data.corpus.data_files=[{corpus}/*{suffix}]", f"--data.corpus.cache_dir={tmp_path / 'cache'}"]


def _jsonl_lines(*rows: str) -> bytes:
    from tests.corpora import make_documents

    good = [json.dumps({"text": text}) for text in make_documents(count=4)]
    return ("\n".join([*good[:2], *rows, *good[2:]]) + "\n").encode()


def _parquet_with_numbers(prepared: Prepared, tmp_path: Path) -> list[str]:
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"text": list(range(8))}), tmp_path / "corpus" / "numbers.parquet")
    return [f"--data.corpus.data_files=[{tmp_path}/corpus/*.parquet]", f"--data.corpus.cache_dir={tmp_path / 'cache'}"]


def _one_document(prepared: Prepared, tmp_path: Path) -> list[str]:
    from tests.corpora import make_documents

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "only.txt").write_text("\n".join(make_documents(count=6)))
    return [f"--data.corpus.data_files=[{tmp_path}/corpus/*.txt]", f"--data.corpus.cache_dir={tmp_path / 'cache'}"]


def _broken_manifest(prepared: Prepared, tmp_path: Path) -> list[str]:
    recipe = prepared.copy_to(tmp_path)
    (tmp_path / "run" / "checkpoints" / "manifest.json").write_text("{not json")
    return ["--config", str(recipe)]


def _all_checkpoints_damaged(prepared: Prepared, tmp_path: Path) -> list[str]:
    recipe = prepared.copy_to(tmp_path)
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:64])
    return ["--config", str(recipe)]


def _torch_file(tmp_path: Path, name: str, content: str) -> Path:
    """A complete ``torch.save`` archive that is no training checkpoint: a tensor, or a dict without its entries."""
    import torch

    path = tmp_path / name
    torch.save(torch.zeros(3) if content == "tensor" else {"weights": torch.zeros(3)}, path)
    return path


def _corpus_pattern(prepared: Prepared) -> str:
    return yaml.safe_load(prepared.recipe.read_text())["data"]["corpus"]["data_files"][0]


def _mixture_args(prepared: Prepared, *entries: str) -> list[str]:
    return ["--data.corpus.data_files=[]", f"--data.corpora=[{', '.join(entries)}]"]


def _source(name: str, pattern: str, weight: float | str = 1.0) -> str:
    return f'{{"name": "{name}", "data_files": ["{pattern}"], "weight": {weight}}}'


def _foreign_prepared_dir(prepared: Prepared, tmp_path: Path) -> list[str]:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("not prepared data")
    return [f"--data.prepared_dir={tmp_path / 'busy'}"]


def _prepared_with_other_tokenizer(prepared: Prepared, tmp_path: Path) -> list[str]:
    from tests.corpora import make_documents, make_tokenizer

    path, _ = make_tokenizer(tmp_path / "other", make_documents(count=6, seed=3))
    main(
        [
            "prepare",
            "--config",
            str(prepared.recipe),
            f"--data.corpus.tokenizer={path}",
            f"--data.prepared_dir={tmp_path / 'p'}",
        ]
    )
    return [f"--data.prepared_dir={tmp_path / 'p'}"]


NO_TEXT_ROWS = b'{"body": "a"}\n{"text": null}\n{}\n'


def _damaged_last(prepared: Prepared, tmp_path: Path, truncate: bool) -> list[str]:
    recipe = prepared.copy_to(tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if truncate else data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    return ["--config", str(recipe), "--ckpt_path=last"]


def _no_checkpoints(prepared: Prepared, tmp_path: Path) -> list[str]:
    recipe = prepared.copy_to(tmp_path)
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    return ["--config", str(recipe), "--ckpt_path=last"]


def _lost_manifest_unverifiable(prepared: Prepared, tmp_path: Path) -> list[str]:
    recipe = prepared.copy_to(tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "manifest.json").unlink()
    for checkpoint in checkpoints.glob("*.ckpt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:64])
    return ["--config", str(recipe)]


def _run_dir_in_use(prepared: Prepared, tmp_path: Path) -> list[str]:
    recipe = prepared.copy_to(tmp_path)
    owner = {"host": "some-other-node", "pid": 4242, "slurm_job": None, "slurm_restart": 0}
    (tmp_path / "run" / "run.lock").write_text(json.dumps(owner))
    return ["--config", str(recipe)]


def _checkpoint_dir_is_a_file(prepared: Prepared, tmp_path: Path) -> list[str]:
    recipe = prepared.copy_to(tmp_path)
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "checkpoints").write_text("a file where the checkpoint folder should be")
    return ["--config", str(recipe)]


def _csv_version_with_metrics(prepared: Prepared, tmp_path: Path) -> list[str]:
    (tmp_path / "logs" / "v1").mkdir(parents=True)
    (tmp_path / "logs" / "v1" / "metrics.csv").write_text("step,train/lm_loss\n0,5.0\n")
    logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    return [*logger, "--trainer.logger.name=logs", "--trainer.logger.version=v1"]


def _corrupt_init_from(prepared: Prepared, tmp_path: Path) -> list[str]:
    prepared.copy_to(tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    return [f"--model.init_from={last}", "--trainer.default_root_dir=" + str(tmp_path / "fresh")]


BAD_INPUTS = [
    BadInput("top_k_above_experts", ["--model.arch.moe.top_k=9"], ["moe.top_k=9", "[1, moe.num_experts=4]"]),
    BadInput("unknown_key", ["--model.arch.moe.num_expertz=4"], ["num_expertz"]),
    BadInput("bad_choice", ["--model.arch.moe.score_fn=tanh"], ["score_fn", "softmax"]),
    BadInput("batch_size_zero", ["--data.batch_size=0"], ["batch_size=0", ">= 1"]),
    BadInput("negative_workers", ["--data.num_workers=-1"], ["num_workers=-1", ">= 0"]),
    BadInput("seq_len_zero", ["--data.corpus.seq_len=0"], ["seq_len=0", ">= 1"]),
    BadInput("val_fraction_one", ["--data.corpus.val_fraction=1.0"], ["val_fraction=1.0", "[0, 1)"]),
    BadInput("vocab_below_bytes", ["--data.corpus.vocab_size=100"], ["vocab_size=100", ">= 257"]),
    BadInput("no_data_source", ["--data.corpus.data_files=[]"], ["give exactly one"]),
    BadInput("unknown_extension", ["--data.corpus.data_files=[corpus/*.csv]"], ["'corpus/*.csv'", "must end in"]),
    BadInput("missing_data", ["--data.corpus.data_files=[/nonexistent/*.txt]"], ["matches no file", "fix the path"]),
    BadInput("empty_data", expected=["needs at least 33", "add documents"], setup=_empty_documents),
    BadInput(
        "invalid_utf8_text_file",
        expected=["latin1.txt is not valid UTF-8 text (byte 13, line 2", "iconv"],
        setup=lambda prepared, tmp: _documents_with(tmp, "latin1.txt", b"Romeo\nJuliet \xe9t\xe9\n", ".txt"),
    ),
    BadInput(
        "malformed_jsonl_line",
        expected=["rows.jsonl line 3 is not valid JSON"],
        setup=lambda prepared, tmp: _documents_with(tmp, "rows.jsonl", _jsonl_lines('{"text": "cut off'), ".jsonl"),
    ),
    BadInput(
        "jsonl_line_not_an_object",
        expected=["rows.jsonl line 3 is a JSON list, not an object"],
        setup=lambda prepared, tmp: _documents_with(tmp, "rows.jsonl", _jsonl_lines('["a", "b"]'), ".jsonl"),
    ),
    BadInput(
        "jsonl_text_of_mixed_types",
        expected=["text_field='text' holds mixed-type (JSON) values, not text", "rows.jsonl line 3: int"],
        setup=lambda prepared, tmp: _documents_with(tmp, "rows.jsonl", _jsonl_lines('{"text": 42}'), ".jsonl"),
    ),
    BadInput(
        "jsonl_without_text_field",
        expected=["text_field='text': none of the 3 rows has this field"],
        setup=lambda prepared, tmp: _documents_with(tmp, "rows.jsonl", NO_TEXT_ROWS, ".jsonl"),
    ),
    BadInput(
        "parquet_text_column_of_numbers",
        expected=["text_field='text' holds int64 values, not text", "numbers.parquet", "token_field"],
        setup=_parquet_with_numbers,
    ),
    BadInput(
        "empty_validation_split",
        expected=["validation split is empty", "1 document(s)", "data.corpus.val_fraction=0"],
        setup=_one_document,
    ),
    BadInput(
        "seq_len_above_max_seq_len",
        ["--data.corpus.seq_len=33"],
        ["data.corpus.seq_len=33", "model.arch.max_seq_len=32"],
    ),
    BadInput("missing_tokenizer", ["--data.corpus.tokenizer=/nonexistent/tok.json"], ["no tokenizer file", "prepare"]),
    BadInput(
        "unreadable_tokenizer",
        expected=["not a readable tokenizer.json"],
        setup=lambda prepared, tmp: [f"--data.corpus.tokenizer={_garbage_file(tmp, 'tokenizer.json')}"],
    ),
    BadInput(
        # A fresh run: resuming, the checkpoint comparison reports the changed vocabulary first.
        "model_vocab_below_tokenizer",
        ["--model.arch.vocab_size=200", "--auto_resume=false"],
        ["vocab_size=200", "set model.arch"],
    ),
    BadInput("warmup_past_max_steps", ["--model.optim.warmup_steps=50"], ["warmup_steps=50", "max_steps"]),
    BadInput("negative_lr", ["--model.optim.lr=-1"], ["optim.lr=-1", "positive"]),
    BadInput("missing_init_from", ["--model.init_from=/nonexistent.ckpt"], ["init_from", "is not a file"]),
    BadInput(
        "unreadable_init_from",
        expected=["init_from", "not a readable checkpoint"],
        setup=lambda prepared, tmp: [f"--model.init_from={_garbage_file(tmp, 'weights.ckpt')}"],
    ),
    BadInput("missing_ckpt_path", ["--ckpt_path=/nonexistent/step.ckpt"], ["does not exist", "earlier checkpoint"]),
    BadInput(
        "truncated_ckpt_path",
        expected=["epoch=0-step=2.ckpt", "truncated"],
        setup=lambda prepared, tmp: _corrupt_newest(prepared, tmp, truncate=True),
    ),
    BadInput(
        "corrupt_ckpt_path",
        expected=["epoch=0-step=2.ckpt", "SHA-256", "corrupted"],
        setup=lambda prepared, tmp: _corrupt_newest(prepared, tmp, truncate=False),
    ),
    BadInput(
        "resume_with_other_model",
        ["--model.arch.hidden_dim=48", "--model.arch.moe.num_experts=8"],
        [
            "2 setting(s)",
            "arch.hidden_dim: checkpoint 32 != recipe 48",
            "arch.moe.num_experts: checkpoint 4 != recipe 8",
        ],
    ),
    BadInput(
        "explicit_ckpt_path_with_other_model",
        expected=["arch.hidden_dim: checkpoint 32 != recipe 48"],
        setup=lambda prepared, tmp: [f"--ckpt_path={prepared.checkpoints / 'last.ckpt'}", "--model.arch.hidden_dim=48"],
    ),
    BadInput(
        "resume_with_other_sdmoe", ["--model.sdmoe.rank=2"], ["sdmoe.rank: checkpoint 4 != recipe 2", "init_from"]
    ),
    BadInput("resume_with_other_tokenizer", expected=["tokenizer.sha256", "tokenizer"], setup=_other_tokenizer),
    BadInput("broken_manifest", expected=["manifest.json", "not readable", "--ckpt_path"], setup=_broken_manifest),
    BadInput(
        "all_checkpoints_damaged", expected=["no checkpoint", "verifies", "afresh"], setup=_all_checkpoints_damaged
    ),
    BadInput(
        "keep_last_k_zero",
        [
            "--trainer.callbacks+=sdmoe_train.lightning.callbacks.PeriodicCheckpoint",
            "--trainer.callbacks.keep_last_k=0",
        ],
        ["keep_last_k=0", ">= 1"],
    ),
    BadInput(
        "nonfinite_limit_zero",
        [
            "--trainer.callbacks+=sdmoe_train.lightning.callbacks.NonFiniteGuard",
            "--trainer.callbacks.max_consecutive=0",
        ],
        ["max_consecutive=0", ">= 1"],
    ),
    BadInput("ep_size_not_dividing_experts", ["--model.parallel.ep_size=3"], ["ep_size=3", "moe.num_experts=4"]),
    BadInput("ep_size_not_dividing_world_size", ["--model.parallel.ep_size=2"], ["ep_size=2", "world size 1"]),
    BadInput(
        "unknown_requeue_signal",
        [
            "--trainer.callbacks+=sdmoe_train.lightning.callbacks.PreemptionHandler",
            "--trainer.callbacks.requeue_signal=SIGFOO",
        ],
        ["SIGFOO", "SIGUSR1"],
    ),
    BadInput(
        "mixture_weight_not_positive",
        expected=["data.corpora[a].weight=0.0", "positive finite"],
        setup=lambda prepared, tmp: _mixture_args(prepared, _source("a", _corpus_pattern(prepared), 0.0)),
    ),
    BadInput(
        "mixture_weight_not_finite",
        expected=["data.corpora[a].weight=nan", "positive finite"],
        setup=lambda prepared, tmp: _mixture_args(prepared, _source("a", _corpus_pattern(prepared), ".nan")),
    ),
    BadInput(
        "mixture_duplicate_names",
        expected=["data.corpora names ['a'] more than once"],
        setup=lambda prepared, tmp: _mixture_args(
            prepared, _source("a", _corpus_pattern(prepared)), _source("a", _corpus_pattern(prepared))
        ),
    ),
    BadInput(
        "mixture_source_without_files",
        ["--data.corpus.data_files=[]", '--data.corpora=[{"name": "a", "weight": 1.0}]'],
        ["data.corpora[a] has no documents", "data_files"],
    ),
    BadInput(
        "mixture_source_with_bad_name",
        expected=["name='a b'", "letters, digits"],
        setup=lambda prepared, tmp: _mixture_args(prepared, _source("a b", _corpus_pattern(prepared))),
    ),
    BadInput(
        "mixture_source_missing_files",
        expected=["data.corpora[a].data_files entry", "matches no file"],
        setup=lambda prepared, tmp: _mixture_args(prepared, _source("a", "/nonexistent/*.txt")),
    ),
    BadInput(
        "mixture_and_corpus_files",
        expected=["data.corpora both name documents"],
        setup=lambda prepared, tmp: [f"--data.corpora=[{_source('a', _corpus_pattern(prepared))}]"],
    ),
    BadInput("mixture_without_sources", ["--data.corpus.data_files=[]", "--data.corpora=[]"], ["lists no source"]),
    BadInput(
        "mixture_with_streaming",
        ["--data.corpus.streaming=true"],
        ["streaming=true works with a single data.corpus only"],
        setup=lambda prepared, tmp: _mixture_args(prepared, _source("a", _corpus_pattern(prepared))),
    ),
    BadInput("allow_mixture_change_without_mixture", ["--data.allow_mixture_change=true"], ["needs a mixture"]),
    BadInput(
        "resume_single_corpus_run_as_mixture",
        expected=["belongs to a single data.corpus but this recipe trains on a mixture"],
        setup=lambda prepared, tmp: _mixture_args(prepared, _source("a", _corpus_pattern(prepared))),
    ),
    BadInput("token_field_on_text_files", ["--data.corpus.token_field=input_ids"], ["needs files with columns"]),
    BadInput("prepared_dir_empty", ["--data.prepared_dir= "], ["data.prepared_dir=' ' must name a directory"]),
    BadInput(
        "prepared_dir_of_other_files",
        expected=["non-empty directory without prepared.json", "notes.txt"],
        setup=_foreign_prepared_dir,
    ),
    BadInput(
        "prepared_dir_with_other_tokenizer",
        expected=["prepared with another tokenizer", "use its copy"],
        setup=_prepared_with_other_tokenizer,
    ),
    BadInput(
        "ckpt_path_last_corrupted",
        expected=["last.ckpt", "SHA-256", "corrupted"],
        setup=lambda prepared, tmp: _damaged_last(prepared, tmp, truncate=False),
    ),
    BadInput(
        "ckpt_path_last_truncated",
        expected=["last.ckpt", "truncated"],
        setup=lambda prepared, tmp: _damaged_last(prepared, tmp, truncate=True),
    ),
    BadInput("ckpt_path_last_without_checkpoints", expected=["'last': no checkpoint found"], setup=_no_checkpoints),
    BadInput("ckpt_path_best", ["--ckpt_path=best"], ["ckpt_path='best' is not supported", "'last'"]),
    BadInput(
        "lost_manifest_unverifiable_checkpoints",
        expected=["no manifest.json entry", "--ckpt_path PATH", "afresh"],
        setup=_lost_manifest_unverifiable,
    ),
    BadInput(
        "run_dir_in_use", expected=["in use by another run", "some-other-node", "run.lock"], setup=_run_dir_in_use
    ),
    BadInput(
        "checkpoint_dir_not_writable",
        expected=["cannot write to", "checkpoints", "PeriodicCheckpoint dirpath"],
        setup=_checkpoint_dir_is_a_file,
    ),
    BadInput(
        "csv_version_would_truncate_metrics",
        expected=["version='v1' would overwrite", "remove `version`"],
        setup=_csv_version_with_metrics,
    ),
    BadInput("corrupt_init_from", expected=["init_from", "SHA-256"], setup=_corrupt_init_from),
    # Not-a-number and infinite settings: `value <= 0` is false for NaN, so they need their own check.
    BadInput("lr_not_finite", ["--model.optim.lr=.inf"], ["optim.lr=inf must be positive and finite"]),
    BadInput("adam_eps_zero", ["--model.optim.eps=0"], ["optim.eps=0.0 must be positive"]),
    BadInput("weight_decay_nan", ["--model.optim.weight_decay=.nan"], ["optim.weight_decay=nan", ">= 0 and finite"]),
    BadInput("init_std_nan", ["--model.arch.init_std=.nan"], ["arch.init_std=nan must be positive and finite"]),
    BadInput("aux_loss_coef_inf", ["--model.arch.moe.aux_loss_coef=.inf"], ["moe.aux_loss_coef=inf"]),
    BadInput("capacity_factor_nan", ["--model.arch.moe.capacity_factor=.nan"], ["moe.capacity_factor=nan"]),
    BadInput(
        "ssmoe_tau_inf",
        ["--model.ssmoe.enabled=true", "--model.ssmoe.tau=.inf"],
        ["ssmoe.tau=inf must be positive and finite"],
    ),
    # Trainer settings Lightning accepts but that fail (or flip gradients) once training runs.
    BadInput("accumulate_grad_batches_zero", ["--trainer.accumulate_grad_batches=0"], ["accumulate_grad_batches=0"]),
    BadInput("val_check_interval_zero", ["--trainer.val_check_interval=0"], ["val_check_interval=0"]),
    BadInput(
        "check_val_every_n_epoch_zero",
        ["--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=0"],
        ["check_val_every_n_epoch=0 must be >= 1"],
    ),
    BadInput("gradient_clip_val_negative", ["--trainer.gradient_clip_val=-1"], ["gradient_clip_val=-1", ">= 0"]),
    # Lightning's own checks of the trainer section: a message, not its MisconfigurationException traceback.
    BadInput("max_steps_below_minus_one", ["--trainer.max_steps=-2"], ["invalid trainer setting", "max_steps"]),
    BadInput("limit_val_batches_negative", ["--trainer.limit_val_batches=-1"], ["invalid trainer setting", "-1"]),
    BadInput(
        "logger_save_dir_below_a_file",
        expected=["cannot write to", "(trainer.logger CSVLogger save_dir):", "a_file is a file"],
        setup=lambda prepared, tmp: [
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={_garbage_file(tmp, 'a_file') / 'logs'}",
        ],
    ),
    BadInput(
        "downstream_evaluation_negative_fewshot",
        [
            "--trainer.callbacks+=sdmoe_train.lightning.callbacks.DownstreamEvaluation",
            "--trainer.callbacks.num_fewshot=-1",
        ],
        ["DownstreamEvaluation.num_fewshot=-1 must be >= 0"],
    ),
    BadInput(
        "downstream_evaluation_fractional_limit",
        [
            "--trainer.callbacks+=sdmoe_train.lightning.callbacks.DownstreamEvaluation",
            "--trainer.callbacks.limit=2.5",
        ],
        ["DownstreamEvaluation.limit=2.5: a count of documents per task must be whole"],
    ),
    BadInput(
        "ckpt_path_is_a_plain_directory",
        expected=["is a directory but no sharded checkpoint", "rank_00000.pt"],
        setup=lambda prepared, tmp: [f"--ckpt_path={tmp}"],
    ),
    BadInput(
        "ckpt_path_of_a_saved_tensor",
        expected=["tensor.ckpt holds a Tensor, not a training checkpoint"],
        setup=lambda prepared, tmp: [f"--ckpt_path={_torch_file(tmp, 'tensor.ckpt', 'tensor')}"],
    ),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    root = tmp_path_factory.mktemp("prepared")
    recipe = write_tiny_recipe(root, max_steps=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["sdmoe-train"])
        main(["fit", "--config", str(recipe), "--validate_before_fit=false", "--trainer.max_steps=2"])
    assert (root / "run" / "checkpoints" / "epoch=0-step=2.ckpt").is_file()
    # Later cases resume this finished run; give them room for more steps.
    settings = yaml.safe_load(recipe.read_text())
    settings["trainer"]["max_steps"] = 6
    recipe.write_text(yaml.safe_dump(settings))
    return Prepared(root, recipe)


def test_there_are_at_least_twenty_bad_input_cases() -> None:
    assert len({case.name for case in BAD_INPUTS}) == len(BAD_INPUTS) >= 20


def assert_exits_2_naming(argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Runs ``sdmoe-train argv`` and checks that it exits with code 2 and every expected phrase on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error[-2000:]
    for phrase in expected:
        assert phrase in error, f"{phrase!r} missing from:\n{error[-2000:]}"


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.name)
def test_bad_input_fails_fast_naming_problem_and_fix(
    case: BadInput, prepared: Prepared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = case.setup(prepared, tmp_path) if case.setup else []
    assert_exits_2_naming(["fit", "--config", str(prepared.recipe), *case.args, *extra], case.expected, capsys)
    losses = prepared.root / "run" / "losses_rank0.txt"
    assert max(int(line.split()[0]) for line in losses.read_text().splitlines()) == 2, "a training step ran"


def test_seq_len_above_the_model_context_is_refused_before_tokenizing(prepared: Prepared, tmp_path: Path) -> None:
    cache = tmp_path / "fresh_cache"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(prepared.recipe), "--data.corpus.seq_len=64", f"--data.corpus.cache_dir={cache}"])
    assert exit_info.value.code == 2
    assert not cache.exists(), "the token cache was built before the bad seq_len was reported"


# --- `export` and `import`: damaged checkpoints and output directories ---------------------------------


@dataclass
class BadSubcommandInput:
    name: str
    damage: Callable[[Path, Path], list[str]]
    """Damages a copy of the exported checkpoint (first path) under the case's folder (second path) and
    returns the whole command line."""
    expected: list[str] = field(default_factory=list)


def _hf_copy(exported: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "hf"
    shutil.copytree(exported / "hf", copy)
    return copy


def _import_damaged(change: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def damage(exported: Path, tmp_path: Path) -> list[str]:
        hf = _hf_copy(exported, tmp_path)
        change(hf)
        return ["import", str(hf), str(tmp_path / "out")]

    return damage


def _drop_key(path: Path, key: str) -> None:
    import json

    settings = json.loads(path.read_text())
    del settings[key]
    path.write_text(json.dumps(settings))


SHARD = "model-00002-of-00002.safetensors"
"""The second shard of the fixture's export (1 layer, 3.8 MB split at 2 MB)."""
BAD_SUBCOMMAND_INPUTS = [
    BadSubcommandInput(
        "import_missing_shard", _import_damaged(lambda hf: (hf / SHARD).unlink()), [SHARD, "missing", "fetch"]
    ),
    BadSubcommandInput(
        "import_truncated_shard",
        _import_damaged(lambda hf: (hf / SHARD).write_bytes((hf / SHARD).read_bytes()[:50])),
        [SHARD, "truncated"],
    ),
    BadSubcommandInput(
        "import_broken_config",
        _import_damaged(lambda hf: (hf / "config.json").write_text('{"model_type": ')),
        ["config.json", "not valid JSON"],
    ),
    BadSubcommandInput(
        "import_config_not_an_object",
        _import_damaged(lambda hf: (hf / "config.json").write_text("[1, 2]")),
        ["config.json", "not a JSON object"],
    ),
    BadSubcommandInput(
        "import_config_missing_setting",
        _import_damaged(lambda hf: _drop_key(hf / "config.json", "hidden_size")),
        ["config.json", "'hidden_size'"],
    ),
    BadSubcommandInput(
        "import_broken_index",
        _import_damaged(lambda hf: (hf / "model.safetensors.index.json").write_text("{")),
        ["model.safetensors.index.json", "not valid JSON"],
    ),
    BadSubcommandInput(
        "import_index_without_weight_map",
        _import_damaged(lambda hf: (hf / "model.safetensors.index.json").write_text("{}")),
        ["model.safetensors.index.json", "weight_map"],
    ),
    BadSubcommandInput(
        "import_into_its_own_directory",
        lambda exported, tmp: ["import", str(_hf_copy(exported, tmp)), str(tmp / "hf"), "--overwrite"],
        ["another OUT_DIR"],
    ),
    BadSubcommandInput(
        "import_upcycle_top_k_above_experts",
        lambda exported, tmp: [
            "import",
            str(exported / "hf"),
            str(tmp / "out"),
            "--upcycle_experts",
            "2",
            "--upcycle_top_k",
            "3",
        ],
        ["--upcycle_top_k=3 must lie in [1, --upcycle_experts=2]"],
    ),
    BadSubcommandInput(
        "export_truncated_checkpoint",
        lambda exported, tmp: [
            "export",
            str(_garbage_file(tmp, "last.ckpt")),
            str(tmp / "out"),
        ],
        ["last.ckpt", "truncated or not a checkpoint"],
    ),
    BadSubcommandInput(
        "export_into_a_non_empty_directory",
        lambda exported, tmp: ["export", str(exported / "last.ckpt"), str(_hf_copy(exported, tmp))],
        ["is not empty", "config.json", "--overwrite"],
    ),
    BadSubcommandInput(
        "export_below_a_file",
        lambda exported, tmp: ["export", str(exported / "last.ckpt"), str(_garbage_file(tmp, "x") / "out")],
        ["is a file"],
    ),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import importlib.metadata

    import torch

    from sdmoe_train.lightning.module import PretrainModule
    from sdmoe_train.models import presets

    pytest.importorskip("safetensors")
    root = tmp_path_factory.mktemp("exported")
    config = presets.tiny_qwen_moe()
    config.n_layers, config.vocab_size, config.max_seq_len = 1, 64, 32
    module = PretrainModule(config)
    module.configure_model()  # the weights exist only once materialised (built on the meta device)
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": importlib.metadata.version("lightning"),
    }
    torch.save(checkpoint, root / "last.ckpt")
    main(["export", str(root / "last.ckpt"), str(root / "hf"), "--max_shard_size", "2MB"])
    assert (root / "hf" / SHARD).is_file(), sorted(p.name for p in (root / "hf").iterdir())
    return root


@pytest.mark.parametrize("case", BAD_SUBCOMMAND_INPUTS, ids=lambda case: case.name)
def test_bad_export_or_import_input_exits_2_naming_the_file(
    case: BadSubcommandInput, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_exits_2_naming(case.damage(exported, tmp_path), case.expected, capsys)


# --- the other subcommands: their arguments and output paths --------------------------------------------


@dataclass
class BadArguments:
    name: str
    argv: Callable[[Prepared, Path], list[str]]
    """The whole command line, given the prepared run and the case's folder."""
    expected: list[str] = field(default_factory=list)


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def _damaged_metrics(tmp_path: Path) -> Path:
    metrics = tmp_path / "run" / "logs" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("step,train/lm_loss\n0,5.0\n1,\x00garbage\n")
    return tmp_path / "run"


def _ssmoe_eval(prepared: Prepared, *extra: str) -> list[str]:
    return [
        "ssmoe-eval",
        "--config",
        str(prepared.recipe),
        "--ckpt_path",
        str(prepared.checkpoints / "last.ckpt"),
        *extra,
    ]


def _evaluate(prepared: Prepared, *extra: str) -> list[str]:
    pytest.importorskip("lm_eval")
    checkpoint = str(prepared.checkpoints / "last.ckpt")
    return ["evaluate", "--config", str(prepared.recipe), "--ckpt_path", checkpoint, "--tasks", "shakespeare", *extra]


BAD_ARGUMENTS = [
    BadArguments(
        "report_damaged_metrics_csv",
        lambda prepared, tmp: ["report", str(_damaged_metrics(tmp))],
        ["metrics.csv line 3 is not a metrics table", "garbage", "repair"],
    ),
    BadArguments(
        "report_out_below_a_file",
        lambda prepared, tmp: ["report", str(tmp), "--out", str(_a_file(tmp) / "report.html")],
        ["cannot write to", "a_file", "(--out)"],
    ),
    BadArguments(
        "presets_write_into_a_file",
        lambda prepared, tmp: ["presets", "--write", str(_a_file(tmp))],
        ["--write=", "a_file' is a file, not a directory"],
    ),
    BadArguments(
        "demo_corpus_into_a_file",
        lambda prepared, tmp: ["demo-corpus", str(_a_file(tmp))],
        ["DEST=", "a_file' is a file, not a directory"],
    ),
    BadArguments(
        "kjv_corpus_below_a_file",
        lambda prepared, tmp: ["kjv-corpus", str(_a_file(tmp) / "kjv")],
        ["cannot write to", "a_file/kjv' (DEST)"],
    ),
    BadArguments(
        "ssmoe_eval_ckpt_path_is_a_directory",
        lambda prepared, tmp: [*_ssmoe_eval(prepared)[:-1], str(tmp)],
        ["--ckpt_path=", "is a directory", "sdmoe-train consolidate"],
    ),
    BadArguments(
        "ssmoe_eval_not_a_lightning_checkpoint",
        lambda prepared, tmp: [*_ssmoe_eval(prepared)[:-1], str(_torch_file(tmp, "weights.ckpt", "dict"))],
        ["weights.ckpt' has no model architecture", "sdmoe-train fit"],
    ),
    BadArguments(
        "ssmoe_eval_without_blends",
        lambda prepared, tmp: _ssmoe_eval(prepared, "--blends", "[]"),
        ["--blends is empty"],
    ),
    BadArguments(
        "ssmoe_eval_limit_val_batches_zero",
        lambda prepared, tmp: _ssmoe_eval(prepared, "--limit_val_batches", "0"),
        ["--limit_val_batches=0 must be >= 1"],
    ),
    BadArguments(
        "ssmoe_eval_output_is_a_directory",
        lambda prepared, tmp: _ssmoe_eval(prepared, "--output", str(tmp)),
        ["--output=", "is a directory; give a file name"],
    ),
    BadArguments(
        "evaluate_out_is_a_directory",
        lambda prepared, tmp: _evaluate(prepared, "--out", str(tmp)),
        ["--out=", "is a directory; give a file name"],
    ),
    BadArguments(
        "evaluate_fractional_limit_above_one",
        lambda prepared, tmp: _evaluate(prepared, "--limit", "1.5"),
        ["--limit=1.5: a count of documents per task must be whole"],
    ),
    BadArguments(
        "evaluate_negative_bootstrap_iters",
        lambda prepared, tmp: _evaluate(prepared, "--bootstrap_iters", "-1"),
        ["--bootstrap_iters=-1 must be >= 0"],
    ),
    BadArguments(
        "build_eval_tasks_out_is_a_file",
        lambda prepared, tmp: ["build-eval-tasks", "--config", str(prepared.recipe), "--out", str(_a_file(tmp))],
        ["--out=", "a_file' is a file, not a directory"],
    ),
    BadArguments(
        "consolidate_damaged_rank_file",
        lambda prepared, tmp: ["consolidate", str(_garbage_file(tmp, "rank_00000.pt").parent), str(tmp / "out.ckpt")],
        ["cannot consolidate", "rank_00000.pt is not a complete torch checkpoint archive"],
    ),
    BadArguments(
        "consolidate_out_below_a_file",
        lambda prepared, tmp: ["consolidate", str(tmp), str(_a_file(tmp) / "out.ckpt")],
        ["cannot write to", "a_file' (OUT.ckpt)"],
    ),
    BadArguments(
        # Without Slurm, scontrol is missing; with it, the id is unknown: either way a message, not a traceback.
        "requeue_unknown_job",
        lambda prepared, tmp: ["requeue", "no-such-job", "--no_release"],
        ["requeue job", "no-such-job"],
    ),
]


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=lambda case: case.name)
def test_bad_subcommand_argument_exits_2_naming_it(
    case: BadArguments, prepared: Prepared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_exits_2_naming(case.argv(prepared, tmp_path), case.expected, capsys)
