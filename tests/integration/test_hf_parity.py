"""Logit parity with transformers: our export loaded by ``AutoModelForCausalLM``, and import of HF models.

Tolerance: fp32 on CPU, ``atol=2e-5, rtol=1e-4`` on logits of magnitude ~1. The two implementations differ
only in summation order (fused vs separate gate/up GEMMs, SDPA vs eager attention), which leaves ~1e-6
differences; a wrong mapping (one permuted rope row, one misplaced expert) moves logits by ~1e-2 or more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sdmoe_train.cli import main
from sdmoe_train.interop.hf.driver import export_model, import_model
from sdmoe_train.models import presets
from sdmoe_train.models.config import MLAConfig, TransformerConfig
from sdmoe_train.models.transformer import Transformer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
ATOL, RTOL = 2e-5, 1e-4
VOCAB = 128


def _qwen2(variant: str) -> TransformerConfig:
    config = presets.tiny_qwen_moe()
    config.n_layers, config.vocab_size, config.hidden_dim, config.dense_hidden_dim = 3, VOCAB, 64, 96
    config.attention.head_dim = 24  # != hidden_dim / num_heads, so head_dim must travel in config.json
    config.moe.expert_hidden_dim, config.moe.shared_expert_hidden_dim = 32, 48
    if variant == "dense_first":
        config.moe.first_k_dense, config.moe.norm_topk_prob, config.tie_embeddings = 1, True, True
    return config


def _deepseek(variant: str) -> TransformerConfig:
    config = presets.tiny_deepseek_moe()
    config.n_layers, config.vocab_size, config.hidden_dim, config.dense_hidden_dim = 3, VOCAB, 64, 96
    config.moe.expert_hidden_dim = 24
    if variant == "direct_query":
        config.attention.mla = MLAConfig(
            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12
        )
        config.moe.n_group, config.moe.topk_group, config.moe.norm_topk_prob = 1, 1, False
    return config


def _qwen3() -> TransformerConfig:
    config = _qwen2("plain")
    config.attention.qkv_bias, config.attention.qk_norm, config.norm_eps = False, True, 1e-5
    config.moe.num_shared_experts, config.moe.shared_expert_gate, config.moe.norm_topk_prob = 0, False, True
    return config


CASES = {
    "qwen2_moe-plain": ("qwen2_moe", _qwen2("plain")),
    "qwen2_moe-dense_first": ("qwen2_moe", _qwen2("dense_first")),
    "deepseek_v3-grouped": ("deepseek_v3", _deepseek("grouped")),
    "deepseek_v3-direct_query": ("deepseek_v3", _deepseek("direct_query")),
    "qwen3_moe": ("qwen3_moe", _qwen3()),
}


@torch.no_grad()
def _perturb(module: torch.nn.Module) -> None:
    # Init leaves norms at 1 and biases at 0, which would hide a swapped norm or bias.
    for param in module.parameters():
        param.add_(torch.randn_like(param) * 0.05)


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_model_logits_match_transformers(case: str, tmp_path: Path) -> None:
    arch, config = CASES[case]
    model = Transformer(config).eval()
    _perturb(model)
    with torch.no_grad():
        for _, layer in model.moe_layers():
            if config.moe.score_fn == "sigmoid":
                layer.router.selection_bias.copy_(torch.randn(config.moe.num_experts) * 0.1)
    assert export_model(model, tmp_path, max_shard_size="100KB").arch == arch
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours = model(tokens).logits
    torch.testing.assert_close(_hf_logits(tmp_path, tokens), ours, atol=ATOL, rtol=RTOL)


def _random_hf_model(arch: str, rope_interleave: bool = True) -> torch.nn.Module:
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
    }
    if arch == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **common,
            num_key_value_heads=2,
            num_experts=6,
            shared_expert_intermediate_size=40,
            mlp_only_layers=[0],
            norm_topk_prob=True,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, num_key_value_heads=2, head_dim=24, num_experts=6, norm_topk_prob=True, rms_norm_eps=1e-5
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.DeepseekV3Config(
            **common,
            num_key_value_heads=4,  # MLA in transformers only works with as many key/value heads as heads
            n_routed_experts=8,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            num_nextn_predict_layers=0,
            rope_interleave=rope_interleave,
        )
        model = transformers.DeepseekV3ForCausalLM(config)
    _perturb(model)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    return model.float().eval()


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert_files", "fused_files"])
@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_imported_model_reproduces_transformers_logits(arch: str, fused: bool, tmp_path: Path) -> None:
    hf_model = _random_hf_model(arch)
    hf_model.save_pretrained(tmp_path, save_original_format=not fused)
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        ours = import_model(tmp_path).eval()(tokens).logits
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_dense_import_and_upcycling_reproduce_transformers_logits(arch: str, tmp_path: Path) -> None:
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
    }
    if arch == "qwen2":
        hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**settings))
    else:
        hf_model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**settings, head_dim=24))
    _perturb(hf_model)
    hf_model.float().eval().save_pretrained(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        dense = import_model(tmp_path).eval()
        upcycled = import_model(tmp_path, upcycle_experts=4, upcycle_top_k=2).eval()
        torch.testing.assert_close(dense(tokens).logits, expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(upcycled(tokens).logits, expected, atol=ATOL, rtol=RTOL)
    assert dense.config.moe is None and upcycled.config.moe.num_experts == 4
    main(["import", str(tmp_path), str(tmp_path / "ours"), "--upcycle_experts", "4", "--upcycle_top_k", "2"])
    assert yaml.safe_load((tmp_path / "ours" / "model.yaml").read_text())["moe"]["num_experts"] == 4


@pytest.mark.parametrize("rope_interleave", [True, False], ids=["interleaved", "rotate_half"])
def test_deepseek_import_honours_rope_interleave(rope_interleave: bool, tmp_path: Path) -> None:
    # rope_interleave: false stores the rotary rows in our rotate-half layout; permuting them anyway (as if
    # interleaved) moves the logits by ~1e-2.
    hf_model = _random_hf_model("deepseek_v3", rope_interleave=rope_interleave)
    hf_model.save_pretrained(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        ours = import_model(tmp_path).eval()(tokens).logits
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
