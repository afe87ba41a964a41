"""``torch.compile`` of each decoder block, the way torchtitan compiles its transformer blocks.

Compiling block by block instead of the whole model keeps compile time proportional to the number of
*distinct* blocks (every MoE block shares one graph, the ``first_k_dense`` blocks another), leaves the
embedding, the output head and the loss eager, and composes with activation checkpointing (the checkpoint
wraps the compiled block and recomputes it in backward) and with DDP, which wraps the whole module and
reduces gradients as they appear. ``nn.Module.compile`` compiles in place, so parameter names and
checkpoints are those of the eager model.

Where the compiled graph breaks (measured with ``torch._dynamo.explain`` on the tiny presets, torch 2.13):

- bf16 (``bf16-mixed`` on GPUs): no break; one graph per block, the grouped expert GEMMs included;
- fp32: each grouped expert GEMM runs eagerly between graphs (three per MoE block), because torch's shape
  function for ``grouped_mm``, which tracing needs, accepts bf16 only (the CPU kernel takes fp32 too);
- expert parallelism: the all-to-all exchanges need their split sizes on the host and run between graphs;
- widths the grouped kernel rejects (the per-expert loop): the per-expert split sizes are read on the host.
"""

from __future__ import annotations

from sdmoe_train.models.transformer import Transformer


def compile_blocks(model: Transformer) -> None:
    """Compile every decoder block of ``model`` in place (compilation itself happens at the first forward)."""
    for block in model.blocks:
        block.compile()
