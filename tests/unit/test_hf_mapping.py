"""Hugging Face key/setting mapping without transformers: placement of every tensor, round trips, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.interop.hf.driver import config_from_hf, export_adapter, from_hf_state_dict, hf_config
from sdmoe_train.interop.hf.driver import to_hf_state_dict as driver_to_hf_state_dict
from sdmoe_train.interop.hf.families import adapter_for
from sdmoe_train.interop.hf.families.deepseek_v3 import permute_rope_rows
from sdmoe_train.models import presets
from sdmoe_train.models.config import MLAConfig, TransformerConfig
from sdmoe_train.models.transformer import Transformer

BANKS = ("gate_proj", "up_proj", "down_proj")


def to_hf_state_dict(state: dict[str, torch.Tensor], config: TransformerConfig, arch: str) -> dict[str, torch.Tensor]:
    adapter = adapter_for(arch)
    return driver_to_hf_state_dict(state, config, adapter, hf_config(config, adapter))


def from_hf(tensors: dict[str, torch.Tensor], config: TransformerConfig, arch: str) -> dict[str, torch.Tensor]:
    adapter = adapter_for(arch)
    return from_hf_state_dict(tensors, config, adapter, hf_config(config, adapter))


def _small(name: str) -> TransformerConfig:
    config = presets.PRESETS[name]()
    config.n_layers, config.vocab_size, config.max_seq_len = 3, 64, 32
    return config


def _planted_state(config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A state dict in which every tensor, and every expert of every bank, holds its own constant."""
    state = {key: value.clone() for key, value in Transformer(config).state_dict().items()}
    for code, key in enumerate(sorted(state)):
        state[key].fill_(float(code))
    for key in state:
        if ".experts." in key:
            layer, bank = int(key.split(".")[1]), BANKS.index(key.rsplit(".", 1)[1])
            for expert in range(state[key].shape[0]):
                state[key][expert] = 10_000 * layer + 1_000 * bank + expert
        if key.endswith("selection_bias") and config.moe.score_fn == "softmax":
            state[key].zero_()  # Qwen routers have no bias; a non-zero one is refused (tested below)
    return state


@pytest.mark.parametrize(("preset", "arch"), [("tiny_qwen_moe", "qwen2_moe"), ("tiny_deepseek_moe", "deepseek_v3")])
def test_every_expert_matrix_lands_in_its_own_hf_key_and_comes_back(preset: str, arch: str) -> None:
    config = _small(preset)
    if arch == "qwen2_moe":
        config.moe.first_k_dense = 1
    state = _planted_state(config)
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


def test_mla_rope_rows_are_interleaved_for_hf_and_restored_on_import() -> None:
    weight = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(12, 3)  # 2 heads of 2 nope + 4 rope rows
    interleaved = permute_rope_rows(weight, heads=2, rope_dim=4, to_interleaved=True)
    # Per head: nope rows 0, 1 stay; our rope rows (2, 3 | 4, 5) become pairs (2, 4), (3, 5).
    assert interleaved[:, 0].tolist() == [0, 3, 6, 12, 9, 15, 18, 21, 24, 30, 27, 33]
    assert torch.equal(permute_rope_rows(interleaved, heads=2, rope_dim=4, to_interleaved=False), weight)


def test_deepseek_selection_bias_travels_as_correction_bias() -> None:
    config = _small("tiny_deepseek_moe")
    state = _planted_state(config)
    hf = to_hf_state_dict(state, config, "deepseek_v3")
    bias = hf["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(bias, state["blocks.1.ffn.router.selection_bias"])


@pytest.mark.parametrize(("preset", "arch"), [("tiny_qwen_moe", "qwen2_moe"), ("tiny_deepseek_moe", "deepseek_v3")])
def test_config_round_trips_through_config_json(preset: str, arch: str) -> None:
    config = _small(preset)
    assert export_adapter(config).model_type == arch
    settings = json.loads(json.dumps(hf_config(config, adapter_for(arch))))
    back = config_from_hf(settings)
    assert hf_config(back, adapter_for(arch)) == settings
    assert back.attention == config.attention or arch == "qwen2_moe"  # Qwen spells head_dim out
    assert back.moe.num_experts == config.moe.num_experts and back.moe.first_k_dense == config.moe.first_k_dense


def test_export_refusal_lists_every_differing_setting() -> None:
    config = _small("tiny_qwen_moe")
    config.attention.mla = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    config.moe.score_fn, config.moe.capacity_factor, config.moe.routed_scaling_factor = "sigmoid", 1.25, 2.0
    with pytest.raises(ConfigError) as error:
        adapter_for("qwen2_moe").check_exportable(config)
    message = str(error.value)
    for setting in ("attention.mla", "moe.score_fn=sigmoid", "moe.capacity_factor=1.25", "routed_scaling_factor=2.0"):
        assert setting in message


def test_deepseek_refusal_names_gate_width_and_norm_eps() -> None:
    config = _small("tiny_deepseek_moe")
    config.norm_eps, config.moe.shared_expert_gate, config.moe.shared_expert_hidden_dim = 1e-5, True, 32
    config.moe.group_score_fn = "max"
    with pytest.raises(ConfigError) as error:
        adapter_for("deepseek_v3").check_exportable(config)
    settings = ("arch.norm_eps=1e-05", "shared_expert_gate=true", "shared_expert_hidden_dim=32", "group_score_fn=max")
    assert all(setting in str(error.value) for setting in settings)


def test_unmatched_arch_reports_each_target() -> None:
    config = _small("tiny_qwen_moe")
    config.moe.score_fn = "sigmoid"
    with pytest.raises(ConfigError) as error:
        export_adapter(config)
    assert "qwen2_moe: moe.score_fn=sigmoid" in str(error.value)
    assert "deepseek_v3: attention.mla=null" in str(error.value)
    assert "qwen3_moe: moe.score_fn=sigmoid" in str(error.value)


def test_qwen_export_refuses_a_trained_selection_bias() -> None:
    config = _small("tiny_qwen_moe")
    state = _planted_state(config)
    state["blocks.2.ffn.router.selection_bias"] = torch.ones(config.moe.num_experts)
    with pytest.raises(ConfigError, match=r"selection_bias is non-zero in layers \[2\]"):
        to_hf_state_dict(state, config, "qwen2_moe")


def test_import_refusal_lists_every_unsupported_setting() -> None:
    settings = hf_config(_small("tiny_qwen_moe"), adapter_for("qwen2_moe"))
    settings |= {
        "use_sliding_window": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
        "mlp_only_layers": [1],
        "hidden_act": "gelu",
    }
    with pytest.raises(ConfigError) as error:
        config_from_hf(settings)
    for setting in ("use_sliding_window", "rope_type='yarn'", "mlp_only_layers=[1]", "hidden_act='gelu'"):
        assert setting in str(error.value)


def test_import_names_missing_and_unexpected_tensors() -> None:
    config = _small("tiny_qwen_moe")
    hf = to_hf_state_dict(_planted_state(config), config, "qwen2_moe")
    del hf["model.layers.1.mlp.experts.3.down_proj.weight"]
    hf["model.layers.0.mlp.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"missing \['model.layers.1.mlp.experts.3.down_proj.weight'\].*mystery"):
        from_hf(hf, config, "qwen2_moe")


def test_fused_expert_layout_is_accepted_on_import() -> None:
    config = _small("tiny_qwen_moe")
    state = _planted_state(config)
    hf = to_hf_state_dict(state, config, "qwen2_moe")
    for layer in range(config.n_layers):
        prefix, experts = f"model.layers.{layer}.mlp.experts", range(config.moe.num_experts)
        gate = torch.stack([hf.pop(f"{prefix}.{e}.gate_proj.weight") for e in experts])
        up = torch.stack([hf.pop(f"{prefix}.{e}.up_proj.weight") for e in experts])
        hf[f"{prefix}.gate_up_proj"] = torch.cat((gate, up), dim=1)
        hf[f"{prefix}.down_proj"] = torch.stack([hf.pop(f"{prefix}.{e}.down_proj.weight") for e in experts])
    back = from_hf(hf, config, "qwen2_moe")
    assert all(torch.equal(back[key], state[key]) for key in state)


# File-level tests need safetensors (an export dependency), not transformers.


@pytest.mark.parametrize("preset", ["tiny_qwen_moe", "tiny_deepseek_moe"])
def test_export_import_export_is_byte_identical(preset: str, tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from sdmoe_train.interop.hf.driver import export_model, import_model

    config = _small(preset)
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

    config = _small("tiny_qwen_moe")
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
    copy_tokenizer(source, tmp_path / "out", _small("tiny_qwen_moe"))
    settings = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert settings["eos_token"] == "<|endoftext|>" and (tmp_path / "out" / "tokenizer.json").is_file()


def test_aux_loss_coefficient_is_converted_both_ways_and_explained() -> None:
    config = _small("tiny_qwen_moe")  # 3 MoE layers, top-2
    config.moe.aux_loss_coef = 0.01
    adapter = adapter_for("qwen2_moe")
    settings = hf_config(config, adapter)
    assert settings["router_aux_loss_coef"] == 0.015  # x 3 MoE layers / top_k 2
    assert config_from_hf(settings).moe.aux_loss_coef == 0.01
    (note,) = adapter.conversion_notes(config)
    assert "moe.aux_loss_coef=0.01 <-> router_aux_loss_coef=0.015" in note and "3 MoE layers / top_k 2" in note
    assert adapter_for("deepseek_v3").conversion_notes(_small("tiny_deepseek_moe")) == []


@pytest.mark.parametrize("interleaved", [True, False])
def test_deepseek_rotary_rows_are_permuted_only_for_interleaved_checkpoints(interleaved: bool) -> None:
    config = _small("tiny_deepseek_moe")
    pairs = {ours: fn for ours, _, fn in adapter_for("deepseek_v3").key_pairs(config, {"rope_interleave": interleaved})}
    weight = torch.randn(config.attention.num_heads * 48, 64)  # (qk_nope 32 + qk_rope 16) rows per head
    imported = pairs["blocks.0.attn.q_b_proj.weight"](weight, False)
    assert torch.equal(imported, weight) != interleaved
    assert torch.equal(pairs["blocks.0.attn.q_b_proj.weight"](imported, True), weight)


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
