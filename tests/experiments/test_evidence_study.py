"""The SD-MoE evidence study's helpers (experiments/): corpus preparation, measurements, recipes, summaries."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import evidence_corpus
import numpy as np
import pytest
import torch
from evidence_heldout import mean_token_loss
from evidence_probe import complement_part, matrix_structure, pair_overlaps, touching_share
from evidence_report import chance_levels, first_crossing, spread
from evidence_study import ARMS, Layout, Study, run_recipe
from sdmoe_evidence import configure, parse_args

from sdmoe_train.data import kjv_corpus
from sdmoe_train.data.config import DataConfig
from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.models.config import MoEConfig, TransformerConfig
from sdmoe_train.moe.sdmoe import SDMoEConfig

# --- corpus --------------------------------------------------------------------------------------------


def test_kjv_chapters_strip_verse_prefixes_and_group_verses_by_chapter() -> None:
    lines = [
        "Ge1:1 In the beginning God created the heaven and the earth.",
        "Ge1:2 And the earth was without form.",
        "Ge2:1 Thus the heavens and the earth were finished.",
        "",
        "1Sa3:4 That the LORD called Samuel: and he answered, Here am I.",
        "1Sa3:5 And he ran unto Eli.",
    ]
    assert evidence_corpus.kjv_chapters(lines) == [
        "In the beginning God created the heaven and the earth.\nAnd the earth was without form.",
        "Thus the heavens and the earth were finished.",
        "That the LORD called Samuel: and he answered, Here am I.\nAnd he ran unto Eli.",
    ]


def test_kjv_chapters_reject_a_line_without_a_verse_prefix() -> None:
    with pytest.raises(ValueError, match="line 2 is not a verse"):
        evidence_corpus.kjv_chapters(["Ge1:1 In the beginning.", "The Gospel according to"])


def test_paragraph_chunks_cut_at_blank_lines_within_the_limit_and_keep_every_paragraph() -> None:
    paragraphs = [f"paragraph {index} " + "word " * (index % 7 * 5) for index in range(40)]
    text = "\n\n".join(paragraphs)
    chunks = evidence_corpus.paragraph_chunks(text, max_chars=200)
    assert all(len(chunk) <= 200 for chunk in chunks)
    assert "\n\n".join(chunks) == text.strip()
    assert len(chunks) > 5


def test_heldout_split_is_seeded_disjoint_and_of_the_requested_size() -> None:
    documents = [f"doc {index}" for index in range(100)]
    train, heldout = evidence_corpus.split_heldout(documents, 0.05, seed=3)
    assert len(heldout) == 5 and len(train) == 95
    assert set(train).isdisjoint(heldout) and sorted(train + heldout) == sorted(documents)
    assert evidence_corpus.split_heldout(documents, 0.05, seed=3) == (train, heldout)
    assert evidence_corpus.split_heldout(documents, 0.05, seed=4)[1] != heldout


def test_missing_bible_command_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kjv_corpus.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="apt-get install bible-kjv"):
        evidence_corpus.read_kjv()


def test_prepared_corpus_is_rewritten_only_when_its_content_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        evidence_corpus, "read_kjv", lambda: [f"Ge{c}:{v} verse {c}.{v}" for c in (1, 2) for v in (1, 2)]
    )
    plays = [f"play text {index}" for index in range(30)]
    monkeypatch.setattr(evidence_corpus, "read_shakespeare", lambda: plays)
    files = evidence_corpus.prepare_corpus(tmp_path, heldout_fraction=0.1, seed=0)
    stamps = {path: path.stat().st_mtime_ns for path in [*files.train, *files.heldout.values(), files.manifest]}
    assert files.heldout["shakespeare"].read_text().count("\n") == 3
    evidence_corpus.prepare_corpus(tmp_path, heldout_fraction=0.1, seed=0)
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps, "an unchanged corpus keeps its token cache"
    plays.append("a new play")
    evidence_corpus.prepare_corpus(tmp_path, heldout_fraction=0.1, seed=0)
    assert files.train[1].stat().st_mtime_ns != stamps[files.train[1]]


# --- measurements --------------------------------------------------------------------------------------


def _basis(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))).Q


def test_touching_share_is_one_inside_zero_outside_and_chance_for_a_random_matrix() -> None:
    left, right = _basis(64, 4, 0), _basis(32, 4, 1)
    inside = left @ torch.randn(4, 32) + torch.randn(64, 4) @ right.T
    assert float(touching_share(inside.unsqueeze(0), left, right)) == pytest.approx(1.0, abs=1e-6)
    outside = complement_part(torch.randn(3, 64, 32), left, right)
    assert float(touching_share(outside, left, right)) == pytest.approx(0.0, abs=1e-12)
    random = torch.randn(200, 64, 32, generator=torch.Generator().manual_seed(2))
    expected = 1 - (1 - 4 / 64) * (1 - 4 / 32)
    assert float(touching_share(random, left, right)) == pytest.approx(expected, rel=0.02)


def test_chance_overlap_matches_the_overlap_of_independent_random_experts() -> None:
    study = Study().scaled(hidden_dim=48, **{"moe.expert_hidden_dim": 96})
    chance = chance_levels(study)
    experts = torch.randn(48, 96, 48, generator=torch.Generator().manual_seed(0))
    overlaps = pair_overlaps(experts, [8])
    # gate/up are F x D: the right side is the model-width side.
    assert overlaps["right", 8] == pytest.approx(chance["overlap_d"], rel=0.05)
    assert overlaps["left", 8] == pytest.approx(chance["overlap_f"], rel=0.05)


def test_structure_metrics_see_a_planted_shared_component_and_remove_it() -> None:
    generator = torch.Generator().manual_seed(0)
    shared = 64 * _basis(128, 8, 3) @ _basis(64, 8, 4).T
    experts = shared + torch.randn(8, 128, 64, generator=generator)
    metrics = matrix_structure(experts, "up", ranks=[8], removed_ranks=[8], rank=8)
    assert metrics["overlap_r8_d"] > 0.9 and metrics["overlap_r8_f"] > 0.9
    assert metrics["common_mode_share"] > 0.5
    # Once the shared rank-8 component is gone, what is left is independent noise: chance level r/(m - k).
    assert metrics["residual_overlap_k8_d"] == pytest.approx(8 / 56, rel=0.15)
    assert metrics["residual_overlap_k8_f"] == pytest.approx(8 / 120, rel=0.15)
    same = matrix_structure(experts[:1].expand(4, -1, -1), "down", ranks=[8], removed_ranks=[8], rank=8)
    assert same["overlap_r8_d"] == pytest.approx(1.0) and same["common_mode_share"] == pytest.approx(1.0)


# --- recipes and summaries -----------------------------------------------------------------------------


def test_study_recipes_pin_every_data_architecture_and_optimizer_setting(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out", tmp_path / "data")
    study = Study()
    for arm in ARMS:
        recipe = run_recipe(study, layout, arm, seed=1)
        corpus = recipe["data"]["corpus"]
        # A field added to DataConfig later would silently take its default and change the study.
        assert set(corpus) == {field.name for field in dataclasses.fields(DataConfig)}
        DataConfig(**corpus)
        arch = recipe["model"]["arch"]
        assert set(arch) == {field.name for field in dataclasses.fields(TransformerConfig)}
        assert set(arch["moe"]) == {field.name for field in dataclasses.fields(MoEConfig)}
        assert set(recipe["model"]["optim"]) == {field.name for field in dataclasses.fields(OptimConfig)}
        OptimConfig(**{**recipe["model"]["optim"], "betas": tuple(recipe["model"]["optim"]["betas"])})
        if arm.sdmoe is not None:
            assert SDMoEConfig(**recipe["model"]["sdmoe"]).seed == 1
        assert recipe["data"]["corpus"]["shuffle_seed"] == study.data_seed, "every arm sees the same data order"
    scaled = study.scaled(hidden_dim=512, **{"moe.expert_hidden_dim": 1024}, steps=10)
    assert scaled.arch["hidden_dim"] == 512 and scaled.arch["moe"]["expert_hidden_dim"] == 1024 and scaled.steps == 10
    assert study.arch["moe"]["expert_hidden_dim"] == 256, "scaling must not change the original settings"


def test_first_crossing_interpolates_and_reports_never() -> None:
    curve = [(0.0, 8.0), (1.0, 6.0), (2.0, 5.0), (3.0, 4.5)]
    assert first_crossing(curve, 5.5) == pytest.approx(1.5)
    assert first_crossing(curve, 6.0) == pytest.approx(1.0)
    assert math.isnan(first_crossing(curve, 4.0))


def test_spread_is_mean_and_half_range_of_finite_values() -> None:
    result = spread([1.0, 3.0, float("nan")])
    assert (result["mean"], result["half_range"]) == (2.0, 1.0)
    assert math.isnan(spread([float("nan")])["mean"])


def test_another_training_corpus_gets_its_own_tokenizer_and_keeps_the_heldout_files(tmp_path: Path) -> None:
    default = Layout(tmp_path / "out", tmp_path / "data")
    custom = Layout(tmp_path / "out", tmp_path / "data", ("corpus/*.jsonl",))
    assert custom.tokenizer != default.tokenizer and custom.tokenizer.parent == default.tokenizer.parent
    recipe = run_recipe(Study(), custom, ARMS[0], seed=1)
    assert recipe["data"]["corpus"]["data_files"] == [str(Path("corpus/*.jsonl").resolve())]
    assert recipe["data"]["corpus"]["tokenizer"] == str(custom.tokenizer.resolve())


def test_command_line_scales_the_study_and_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    study, layout, arms = configure(parse_args(["--scale", "gpu", "--steps", "500", "--arms", "baseline,sdmoe"]))
    assert (study.arch["hidden_dim"], study.arch["moe"]["expert_hidden_dim"], study.steps) == (512, 1024, 500)
    assert (study.precision, study.accelerator) == ("bf16-mixed", "gpu")
    assert [arm.name for arm in arms] == ["baseline", "sdmoe"]
    assert configure(parse_args(["--seq-len", "512"]))[0].arch["max_seq_len"] == 512
    for flags, message in (
        (["--arms", "baseline,bogus"], "--arms='baseline,bogus' names ['bogus']"),
        (["--stages", "train,plot"], "--stages='train,plot' names ['plot']"),
        (["--parallel", "0"], "--parallel=0 must be >= 1"),
        (["--evaluations", "heldout,accuracy"], "--evaluations='heldout,accuracy' names ['accuracy']"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(flags)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# --- held-out perplexity -------------------------------------------------------------------------------


class _NextTokenGuesser(torch.nn.Module):
    """Predicts token x + shift for input x with near-certainty (shift 1 is always right on a counting stream)."""

    def __init__(self, vocab_size: int, shift: int) -> None:
        super().__init__()
        self.vocab_size, self.shift = vocab_size, shift

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return 30.0 * torch.nn.functional.one_hot((tokens_BS + self.shift) % self.vocab_size, self.vocab_size).float()


def test_heldout_loss_scores_every_complete_window_once_whatever_the_batch_size() -> None:
    vocab, seq_len = 11, 4
    tokens = np.arange(3 * seq_len + 3) % vocab  # three complete windows, two tokens left over
    right, scored = mean_token_loss(_NextTokenGuesser(vocab, 1), tokens, seq_len, batch_size=2)
    assert scored == 3 * seq_len
    assert right < 1e-6
    wrong, _ = mean_token_loss(_NextTokenGuesser(vocab, 2), tokens, seq_len, batch_size=2)
    assert wrong == pytest.approx(30.0, abs=1e-3), "a confident wrong guess costs its logit margin"
    uniform = lambda tokens_BS: torch.zeros(*tokens_BS.shape, vocab)  # noqa: E731
    for batch_size in (1, 3, 8):
        loss, _ = mean_token_loss(uniform, tokens, seq_len, batch_size)
        assert loss == pytest.approx(math.log(vocab))
