"""`sdmoe-train evaluate` end to end on a tiny trained SD-MoE checkpoint and offline tasks built from its corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from sdmoe_train.cli import main  # noqa: E402
from sdmoe_train.cli.evaluate import load_evaluation_model  # noqa: E402
from sdmoe_train.data.tokenizer import load_tokenizer  # noqa: E402
from sdmoe_train.evaluation.adapter import SDMoELM  # noqa: E402
from sdmoe_train.interop.hf.checkpoints import load_checkpoint_model  # noqa: E402
from tests.corpora import make_documents, make_tokenizer  # noqa: E402
from tests.integration.evaluation_runs import TinyRun, train_tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return train_tiny_run(tmp_path_factory.mktemp("evaluate"))


def _exit_code_and_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_evaluate_prints_lm_evals_table_writes_its_json_and_repeats_exactly(
    run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = []
    for name in ("first.json", "second.json"):
        main(run.evaluate_args("--out", str(tmp_path / name)))
        results.append(json.loads((tmp_path / name).read_text()))
    printed = capsys.readouterr().out
    for text in ("tiny_next_line", "acc_norm", "tiny_perplexity", "word_perplexity", "bits_per_byte", "|"):
        assert text in printed
    first, second = results
    assert first["results"] == second["results"]
    assert first["n-samples"]["tiny_next_line"]["effective"] == 12
    assert 0.0 <= first["results"]["tiny_next_line"]["acc,none"] <= 1.0
    assert 1.0 < first["results"]["tiny_perplexity"]["byte_perplexity,none"] < 300
    assert first["config"]["model"] == "sdmoe"
    assert first["config"]["model_args"]["ckpt_path"] == str(run.checkpoint)


def test_limit_and_few_shot_examples_reach_lm_eval(run: TinyRun, tmp_path: Path) -> None:
    main(
        run.evaluate_args(
            "--tasks", "tiny_next_line", "--limit", "5", "--num_fewshot", "2", "--out", str(tmp_path / "r.json")
        )
    )
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["n-samples"]["tiny_next_line"]["effective"] == 5
    assert results["n-shot"]["tiny_next_line"] == 2
    assert list(results["results"]) == ["tiny_next_line"]


def test_an_unknown_task_names_close_matches_the_local_tasks_and_how_to_add_more(
    run: TinyRun, capsys: pytest.CaptureFixture[str]
) -> None:
    code, error = _exit_code_and_error(run.evaluate_args("--tasks", "tiny_next_lines"), capsys)
    assert code == 2
    for text in ("unknown task(s): 'tiny_next_lines'", "close matches: tiny_next_line", "--include_path", "network"):
        assert text in error
    assert "shakespeare_next_line" in error  # the shipped tasks are found without --include_path


def test_without_the_eval_extra_evaluate_says_how_to_install_it(
    run: TinyRun, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without lm-eval looks like
    code, error = _exit_code_and_error(run.evaluate_args(), capsys)
    assert code == 2
    assert 'pip install -e ".[eval]"' in error and "lm-eval==0.4.13" in error


def test_a_recipe_with_another_architecture_or_tokenizer_is_refused_naming_the_difference(
    run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, error = _exit_code_and_error(run.evaluate_args("--model.arch.hidden_dim", "48"), capsys)
    assert code == 2
    assert "arch.hidden_dim: checkpoint 32 != recipe 48" in error
    other, _ = make_tokenizer(tmp_path, make_documents(count=5, seed=3), vocab_size=290)
    code, error = _exit_code_and_error(run.evaluate_args("--tokenizer", str(other)), capsys)
    assert code == 2
    assert "tokenizer.vocab_size: checkpoint 300 != recipe 290" in error and "tokenizer.sha256" in error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt_path", "no/such.ckpt"], "does not exist"),
        (["--include_path", "no/such/dir"], "is not a directory"),
        (["--limit", "0"], "--limit=0 must be > 0"),
        (["--device", "tpu"], "--device='tpu'"),
        (["--ssmoe.c", "1.5"], "ssmoe.c=1.5 must lie in [0, 1]"),
    ],
)
def test_bad_arguments_exit_with_a_message(
    run: TinyRun, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, error = _exit_code_and_error(run.evaluate_args(*args), capsys)
    assert code == 2
    assert message in error


def _scores(model: torch.nn.Module, run: TinyRun) -> list[float]:
    tokenizer = load_tokenizer(yaml.safe_load(run.recipe.read_text())["data"]["corpus"]["tokenizer"])
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
        for context, continuation in [("the king", " is dead"), ("doc002: why", " never come thou"), ("", "sea")]
    ]
    return [logprob for logprob, _ in SDMoELM(model, tokenizer).loglikelihood(requests)]


def test_sd_moe_checkpoints_evaluate_unmerged_exactly_like_their_merged_export(run: TinyRun) -> None:
    tokenizer = load_tokenizer(yaml.safe_load(run.recipe.read_text())["data"]["corpus"]["tokenizer"])
    unmerged = load_evaluation_model(run.checkpoint, None, tokenizer)
    assert any(name.endswith("_proj_common") for name, _ in unmerged.named_parameters())  # not merged
    merged = load_checkpoint_model(run.checkpoint)
    assert _scores(unmerged, run) == pytest.approx(_scores(merged, run), abs=1e-5)


def test_the_ssmoe_blend_is_selectable_and_c_zero_is_the_learned_router(run: TinyRun, tmp_path: Path) -> None:
    values = {}
    for blend in (None, "0", "1"):
        out = tmp_path / f"{blend}.json"
        extra = [] if blend is None else ["--ssmoe.c", blend, "--ssmoe.k", "4"]
        main(run.evaluate_args("--tasks", "tiny_perplexity", "--out", str(out), *extra))
        values[blend] = json.loads(out.read_text())["results"]["tiny_perplexity"]["word_perplexity,none"]
    assert values["0"] == pytest.approx(values[None], rel=1e-5)
    assert values["1"] != pytest.approx(values[None], rel=1e-3)


def test_a_model_exported_and_imported_again_evaluates_like_the_checkpoint(
    run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = yaml.safe_load(run.recipe.read_text())["data"]["corpus"]["tokenizer"]
    main(["export", str(run.checkpoint), str(tmp_path / "hf"), "--tokenizer", tokenizer])
    main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")])
    imported = tmp_path / "imported" / "model.ckpt"
    main(run.evaluate_args("--out", str(tmp_path / "original.json")))
    # The recipe's model.arch describes the SD-MoE run; the imported model is its merged plain equivalent.
    main(run.evaluate_args("--ckpt_path", str(imported), "--out", str(tmp_path / "imported.json")))
    assert f"tokenizer': '{tmp_path / 'imported' / 'tokenizer.json'}" in str(
        json.loads((tmp_path / "imported.json").read_text())["config"]["model_args"]
    )
    original, again = (json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("original", "imported"))
    for task, metrics in original.items():
        for key, value in metrics.items():
            if isinstance(value, float):
                assert again[task][key] == pytest.approx(value, rel=1e-4), (task, key)


def test_a_checkpoint_that_lightning_did_not_write_is_refused_with_a_message(
    run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": checkpoint["state_dict"], "hyper_parameters": checkpoint["hyper_parameters"]}, bare)
    args = run.evaluate_args()
    args[args.index("--ckpt_path") + 1] = str(bare)
    code, error = _exit_code_and_error(args, capsys)
    assert code == 2
    assert "is not a Lightning checkpoint" in error
