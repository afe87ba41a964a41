"""Dense Qwen2 and Qwen3 checkpoints (import only): the starting point of sparse upcycling.

Their tensors are named like those of Qwen2-MoE and Qwen3-MoE, with a dense SwiGLU in every layer;
``sdmoe-train import --upcycle_experts N`` then copies each MLP into N experts
(:mod:`sdmoe_train.interop.hf.upcycle`).
"""

from __future__ import annotations

from sdmoe_train.interop.hf.families.qwen2_moe import Qwen2MoeAdapter
from sdmoe_train.interop.hf.families.qwen3_moe import Qwen3MoeAdapter


class Qwen2Adapter(Qwen2MoeAdapter):
    model_type = "qwen2"
    model_class = "Qwen2ForCausalLM"
    exportable = False
    has_moe = False


class Qwen3Adapter(Qwen3MoeAdapter):
    model_type = "qwen3"
    model_class = "Qwen3ForCausalLM"
    exportable = False
    has_moe = False


ADAPTERS = (Qwen2Adapter(), Qwen3Adapter())
