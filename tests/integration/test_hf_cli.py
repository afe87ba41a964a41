"""`sdmoe-train export` / `import`: training checkpoints (plain and SD-MoE) to HF directories and back."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser
from tokenizers import Tokenizer, models

from sdmoe_train.cli import main
from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models import presets
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.moe.sdmoe import SDMoEConfig

pytest.importorskip("safetensors")


def _config(name: str) -> TransformerConfig:
    config = presets.PRESETS[name]()
    config.n_layers, config.vocab_size, config.max_seq_len = 2, 64, 32
    return config


def _save(module: PretrainModule, path: Path, plain_hparams: bool = False) -> Path:
    # The keys Lightning's Trainer.save_checkpoint writes that export reads. Under LightningCLI the
    # hyper-parameters are the parsed config, i.e. plain dicts instead of the typed configs (plain_hparams).
    module.configure_model()  # a module that never ran under a Trainer still has its weights on the meta device
    hparams = {
        key: dataclasses.asdict(value) if plain_hparams and dataclasses.is_dataclass(value) else value
        for key, value in module.hparams.items()
    }
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": hparams,
        "pytorch-lightning_version": importlib.metadata.version("lightning"),
    }
    torch.save(checkpoint, path)
    return path


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("preset", ["tiny_qwen_moe", "tiny_deepseek_moe"])
def test_export_then_import_restores_the_trained_model(
    preset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = PretrainModule(_config(preset))
    module.configure_model()
    tokenizer = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="a")).save(str(tokenizer))
    ckpt = _save(module, tmp_path / "last.ckpt")
    main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf", "--tokenizer", str(tokenizer)])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()
    }
    main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")])
    # Qwen's balancing coefficient is converted (2 MoE layers / top_k 2 here), and both commands say so.
    conversions = capsys.readouterr().out.count("converted: moe.aux_loss_coef=0.01 <-> router_aux_loss_coef=0.01")
    assert conversions == (2 if preset == "tiny_qwen_moe" else 0)

    parser = ArgumentParser()
    parser.add_argument("--arch", type=TransformerConfig)
    arch = parser.instantiate(parser.parse_args([f"--arch={tmp_path / 'imported' / 'model.yaml'}"])).arch
    restored = PretrainModule.load_from_checkpoint(tmp_path / "imported" / "model.ckpt")
    assert restored.arch == arch and (tmp_path / "imported" / "tokenizer.json").is_file()
    tokens = torch.randint(0, 64, (2, 12))
    assert torch.equal(_logits(restored, tokens), _logits(module, tokens))


@pytest.mark.parametrize("plain_hparams", [False, True], ids=["typed-hparams", "cli-dict-hparams"])
def test_sdmoe_checkpoint_is_merged_into_plain_experts_before_export(plain_hparams: bool, tmp_path: Path) -> None:
    from sdmoe_train.interop.hf.driver import import_model

    module = PretrainModule(_config("tiny_qwen_moe"), sdmoe=SDMoEConfig(enabled=True, rank=2))
    module.configure_model()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("_proj_unique"):
                param.add_(torch.randn_like(param) * 0.02)
    ckpt = _save(module, tmp_path / "sdmoe.ckpt", plain_hparams)
    main(["export", str(ckpt), str(tmp_path / "hf"), "--max_shard_size", "100KB"])
    tokens = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(_logits(import_model(tmp_path / "hf"), tokens).logits, _logits(module, tokens))


def test_export_refusal_exits_2_listing_the_differing_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config("tiny_qwen_moe")
    config.moe.capacity_factor, config.moe.routed_scaling_factor = 1.5, 2.0
    ckpt = _save(PretrainModule(config), tmp_path / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(ckpt), str(tmp_path / "hf"), "--arch", "qwen2_moe"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("sdmoe-train: error: cannot export exactly as qwen2_moe")
    assert "moe.capacity_factor=1.5" in error and "moe.routed_scaling_factor=2.0" in error
    assert not (tmp_path / "hf").exists()


def test_import_of_a_directory_without_config_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(tmp_path), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "no config.json" in capsys.readouterr().err


def test_imported_weights_start_a_new_run_through_init_from(tmp_path: Path) -> None:
    module = PretrainModule(_config("tiny_qwen_moe"))
    module.configure_model()
    main(["export", str(_save(module, tmp_path / "last.ckpt")), str(tmp_path / "hf"), "--format", "hf"])
    main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")])
    parser = ArgumentParser()
    parser.add_argument("--arch", type=TransformerConfig)
    arch = parser.instantiate(parser.parse_args([f"--arch={tmp_path / 'imported' / 'model.yaml'}"])).arch

    started = PretrainModule(arch, init_from=str(tmp_path / "imported" / "model.ckpt"))
    started.configure_model()
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(_logits(started, tokens), _logits(module, tokens))


def test_init_from_refuses_a_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    ckpt = _save(PretrainModule(_config("tiny_qwen_moe")), tmp_path / "qwen.ckpt")
    with pytest.raises(ConfigError, match=r"model.init_from=.*does not fit model.arch"):
        PretrainModule(_config("tiny_deepseek_moe"), init_from=str(ckpt))
    with pytest.raises(ConfigError, match=r"holds plain expert weights but model.sdmoe.enabled=True"):
        PretrainModule(_config("tiny_qwen_moe"), sdmoe=SDMoEConfig(enabled=True), init_from=str(ckpt))
    with pytest.raises(ConfigError, match=r"is not a file"):
        PretrainModule(_config("tiny_qwen_moe"), init_from=str(tmp_path / "missing.ckpt"))


def test_re_export_refuses_a_non_empty_directory_and_overwrite_leaves_no_stale_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdmoe_train.interop.hf.driver import import_model

    first, second = PretrainModule(_config("tiny_qwen_moe")), PretrainModule(_config("tiny_qwen_moe"))
    first.configure_model()
    second.configure_model()
    tokenizer = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="a")).save(str(tokenizer))
    out = tmp_path / "hf"
    main(["export", str(_save(first, tmp_path / "first.ckpt")), str(out), "--max_shard_size", "100KB"])
    main(
        [
            "export",
            str(tmp_path / "first.ckpt"),
            str(out),
            "--overwrite",
            "--max_shard_size",
            "100KB",
            "--tokenizer",
            str(tokenizer),
        ]
    )
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    (out / "NOTES.md").write_text("the user's own file")
    config_before = (out / "config.json").read_bytes()
    capsys.readouterr()

    second_ckpt = _save(second, tmp_path / "second.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(second_ckpt), str(out)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not empty" in error and "--overwrite" in error
    assert (out / "config.json").read_bytes() == config_before

    main(["export", str(second_ckpt), str(out), "--overwrite"])
    assert "no tokenizer written" in capsys.readouterr().out
    # One weights file, no shard, index or tokenizer of the first export; the user's file stays.
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "config.json", "model.safetensors"]
    tokens = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(_logits(import_model(out), tokens).logits, _logits(second, tokens))


def test_re_import_refuses_a_non_empty_directory_and_overwrite_replaces_the_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = PretrainModule(_config("tiny_qwen_moe"))
    module.configure_model()
    main(["export", str(_save(module, tmp_path / "last.ckpt")), str(tmp_path / "hf")])
    main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")])
    (tmp_path / "imported" / "tokenizer.json").write_text("{}")  # an earlier import's tokenizer
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main(["import", str(tmp_path / "hf"), str(tmp_path / "imported"), "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "imported").iterdir()) == ["model.ckpt", "model.yaml"]
