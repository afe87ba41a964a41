"""The Hugging Face driver without transformers: placement of every tensor, round trips, files, family discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.interop.hf.driver import config_from_hf, export_adapter, hf_config
from sdmoe_train.interop.hf.families import adapter_for
from sdmoe_train.models.transformer import Transformer
from tests.unit.hf_helpers import BANKS, from_hf, planted_state, small, to_hf_state_dict


@pytest.mark.parametrize(("preset", "arch"), [("tiny_qwen_moe", "qwen2_moe"), ("tiny_deepseek_moe", "deepseek_v3")])
def test_every_expert_matrix_lands_in_its_own_hf_key_and_comes_back(preset: str, arch: str) -> None:
    config = small(preset)
    if arch == "qwen2_moe":
        config.moe.first_k_dense = 1
    state = planted_state(config)
    hf = to_hf_state_dict(state, config, arch)
    moe_layers = [i for i in range(config.n_layers) if config.is_moe_layer(i)]
    assert moe_layers == [1, 2]
    for layer in moe_layers:
        for bank_index, bank in enumerate(BANKS):
            for expert in range(config.moe.num_experts):
                matrix = hf[f"model.layers.{layer}.mlp.experts.{expert}.{bank}.weight"]
                assert torch.all(matrix == 10_000 * layer + 1_000 * bank_index + expert)
    assert "model.layers.0.mlp.gate_proj.weight" in hf and "model.layers.0.mlp.experts.0.up_proj.weight" not in hf
    back = from_hf(hf, config, arch)
    assert back.keys() == state.keys()
    for key in state:
        assert torch.equal(back[key], state[key]), key


@pytest.mark.parametrize(("preset", "arch"), [("tiny_qwen_moe", "qwen2_moe"), ("tiny_deepseek_moe", "deepseek_v3")])
def test_config_round_trips_through_config_json(preset: str, arch: str) -> None:
    config = small(preset)
    assert export_adapter(config).model_type == arch
    settings = json.loads(json.dumps(hf_config(config, adapter_for(arch))))
    back = config_from_hf(settings)
    assert hf_config(back, adapter_for(arch)) == settings
    assert back.attention == config.attention or arch == "qwen2_moe"  # Qwen spells head_dim out
    assert back.moe.num_experts == config.moe.num_experts and back.moe.first_k_dense == config.moe.first_k_dense


def test_unmatched_arch_reports_each_target() -> None:
    config = small("tiny_qwen_moe")
    config.moe.score_fn = "sigmoid"
    with pytest.raises(ConfigError) as error:
        export_adapter(config)
    assert "qwen2_moe: moe.score_fn=sigmoid" in str(error.value)
    assert "deepseek_v3: attention.mla=null" in str(error.value)
    assert "qwen3_moe: moe.score_fn=sigmoid" in str(error.value)


def test_import_names_missing_and_unexpected_tensors() -> None:
    config = small("tiny_qwen_moe")
    hf = to_hf_state_dict(planted_state(config), config, "qwen2_moe")
    del hf["model.layers.1.mlp.experts.3.down_proj.weight"]
    hf["model.layers.0.mlp.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"missing \['model.layers.1.mlp.experts.3.down_proj.weight'\].*mystery"):
        from_hf(hf, config, "qwen2_moe")


@pytest.mark.parametrize("preset", ["tiny_qwen_moe", "tiny_deepseek_moe"])
def test_export_import_export_is_byte_identical(preset: str, tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from sdmoe_train.interop.hf.driver import export_model, import_model

    config = small(preset)
    model = Transformer(config)
    with torch.no_grad():
        for _, layer in model.moe_layers():
            if config.moe.score_fn == "sigmoid":
                layer.router.selection_bias.normal_()
    export_model(model, tmp_path / "first", max_shard_size="200KB")
    imported = import_model(tmp_path / "first")
    export_model(imported, tmp_path / "second", max_shard_size="200KB")
    first, second = (sorted((tmp_path / d).glob("*.safetensors")) for d in ("first", "second"))
    assert len(first) > 1 and [p.name for p in first] == [p.name for p in second]
    for one, two in zip(first, second, strict=True):
        assert one.read_bytes() == two.read_bytes()
        assert safetensors_torch.load_file(str(one)).keys() == safetensors_torch.load_file(str(two)).keys()
    assert (tmp_path / "first" / "config.json").read_text() == (tmp_path / "second" / "config.json").read_text()
    tokens = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, imported.eval()(tokens).logits)


def test_shards_respect_the_size_limit_and_the_index_covers_every_tensor(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from sdmoe_train.interop.hf.driver import export_model
    from sdmoe_train.interop.hf.files import parse_size

    config = small("tiny_qwen_moe")
    export_model(Transformer(config), tmp_path, max_shard_size="300KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert files == sorted(p.name for p in tmp_path.glob("*.safetensors"))
    largest = max(t.numel() * 4 for t in Transformer(config).state_dict().values())
    assert all((tmp_path / name).stat().st_size <= max(parse_size("300KB"), largest) + 65_536 for name in files)
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30
    with pytest.raises(ConfigError, match="max_shard_size='lots'"):
        parse_size("lots")


def test_a_bare_tokenizer_json_gets_a_tokenizer_config(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from tokenizers import Tokenizer, models

    from sdmoe_train.interop.hf.files import copy_tokenizer

    source = tmp_path / "tok.json"
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="a")).save(str(source))
    copy_tokenizer(source, tmp_path / "out", small("tiny_qwen_moe"))
    settings = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert settings["eos_token"] == "<|endoftext|>" and (tmp_path / "out" / "tokenizer.json").is_file()


def test_an_export_with_a_tokenizer_names_its_end_of_text_token_for_generation(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from tokenizers import Tokenizer, models

    from sdmoe_train.interop.hf.driver import export_model

    # Without eos_token_id, transformers' generate() decodes a finished sequence of a batch on past the end of text.
    tokenizer = tmp_path / "tok.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "<|endoftext|>": 2}, unk_token="a")).save(str(tokenizer))
    model = Transformer(small("tiny_qwen_moe"))
    export_model(model, tmp_path / "with", tokenizer=tokenizer)
    assert json.loads((tmp_path / "with" / "config.json").read_text())["eos_token_id"] == 2
    generation = json.loads((tmp_path / "with" / "generation_config.json").read_text())
    assert generation == {"eos_token_id": 2, "pad_token_id": 2}

    export_model(model, tmp_path / "without")
    assert "eos_token_id" not in json.loads((tmp_path / "without" / "config.json").read_text())
    assert not (tmp_path / "without" / "generation_config.json").exists()


def test_families_are_found_by_file_and_the_driver_names_none() -> None:
    from sdmoe_train.interop.hf import adapter, driver
    from sdmoe_train.interop.hf.families import all_adapters, export_adapters

    names = [family.model_type for family in all_adapters()]
    assert names == ["deepseek_v3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"]
    assert [family.model_type for family in export_adapters()] == ["deepseek_v3", "qwen2_moe", "qwen3_moe"]
    for module in (adapter, driver):
        source = Path(module.__file__).read_text()
        assert not [name for name in names if f'"{name}"' in source or f"'{name}'" in source], module.__name__
    with pytest.raises(ConfigError, match="model_type='mixtral' is not supported; supported: deepseek_v3, qwen2"):
        adapter_for("mixtral")
