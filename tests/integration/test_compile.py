"""``model.parallel.compile``: compiled decoder blocks compute what the eager ones do, with SD-MoE and
activation checkpointing, and a compiled 2-process DDP run resumes after SIGKILL to the same losses.

Slow: every test compiles (inductor generates and builds C++ kernels on CPU, tens of seconds per graph).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models import presets
from sdmoe_train.moe.sdmoe import SDMoEConfig, project_gradients
from sdmoe_train.parallel.config import ParallelConfig
from tests.integration.loss_recorder import read_losses
from tests.integration.training_runs import final_losses, run_fit, start_fit, wait_for_step, write_tiny_recipe

pytestmark = pytest.mark.slow

COMPILE = "--model.parallel.compile=true"


def _module(preset: str, compile_blocks: bool, sdmoe: bool, checkpointing: bool) -> PretrainModule:
    config = presets.PRESETS[preset]()
    config.n_layers, config.vocab_size, config.max_seq_len = 2, 128, 32
    if config.moe.first_k_dense:
        config.n_layers = 3  # a dense block and two MoE blocks
    parallel = ParallelConfig(compile=compile_blocks, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    module = PretrainModule(config, sdmoe=SDMoEConfig(enabled=sdmoe, rank=4), parallel=parallel)
    module.configure_model()
    return module


@pytest.mark.parametrize(
    ("preset", "sdmoe", "checkpointing"),
    [("tiny_qwen_moe", False, False), ("tiny_deepseek_moe", True, False), ("tiny_qwen_moe", True, True)],
    ids=["qwen", "deepseek_sdmoe", "qwen_sdmoe_activation_checkpointing"],
)
def test_compiled_blocks_give_the_eager_logits_and_gradients(preset: str, sdmoe: bool, checkpointing: bool) -> None:
    eager, compiled = (_module(preset, flag, sdmoe, checkpointing) for flag in (False, True))
    assert all(block._compiled_call_impl is not None for block in compiled.model.blocks)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep the eager names
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for name, module in (("eager", eager), ("compiled", compiled)):
        out = module.model(tokens)
        (out.logits.float().logsumexp(-1).mean() + out.moe.loss).backward()
        if sdmoe:
            project_gradients(module.model)  # the SD-MoE split works on the compiled model's gradients alike
        outputs[name] = out.logits.detach()
    # Inductor fuses the element-wise work and reorders reductions (norms, softmax), so fp32 results differ
    # by rounding only: relative differences of a few 1e-7 per op, growing to ~1e-6 through two blocks.
    torch.testing.assert_close(outputs["compiled"], outputs["eager"], rtol=1e-4, atol=1e-5)
    compiled_params = dict(compiled.named_parameters())
    for name, param in eager.named_parameters():
        scale = param.grad.abs().max()
        torch.testing.assert_close(compiled_params[name].grad, param.grad, rtol=0, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_moe_block_breaks_only_at_fp32_expert_gemms(dtype: torch.dtype) -> None:
    """bf16 (GPU bf16-mixed): one graph per block. fp32: the grouped expert GEMMs run eagerly between graphs
    (how many graphs that leaves depends on the frames they sit in: 7 with torch 2.13 on the tiny preset)."""
    import torch._dynamo

    from sdmoe_train.models.rope import rotary_tables

    model = _module("tiny_qwen_moe", False, False, False).model.to(dtype)
    block = model.blocks[1]
    x_BSD = torch.randn(2, 32, model.config.hidden_dim, dtype=dtype)
    cos, sin = rotary_tables(32, block.attn.rotary_dim, model.config.attention.rope_theta, x_BSD.device)
    explanation = torch._dynamo.explain(block)(x_BSD, cos, sin)
    if dtype == torch.bfloat16:
        assert explanation.graph_count == 1 and not explanation.break_reasons
    else:
        assert explanation.graph_count > 1
        assert explanation.break_reasons and all("_grouped_mm" in reason.reason for reason in explanation.break_reasons)


def test_compiled_ddp_run_resumes_after_sigkill_to_the_uninterrupted_losses(tmp_path: Path) -> None:
    max_steps = 9
    eager_recipe = write_tiny_recipe(tmp_path / "eager", max_steps=max_steps, devices=2)
    assert run_fit(eager_recipe, tmp_path / "eager.log", timeout=900) == 0, (tmp_path / "eager.log").read_text()[-3000:]
    reference_recipe = write_tiny_recipe(tmp_path / "reference", max_steps=max_steps, devices=2)
    log = tmp_path / "reference.log"
    assert run_fit(reference_recipe, log, COMPILE, timeout=1800) == 0, log.read_text()[-3000:]

    recipe = write_tiny_recipe(tmp_path / "interrupted", max_steps=max_steps, devices=2)
    run_dir, log = tmp_path / "interrupted" / "run", tmp_path / "interrupted.log"
    process = start_fit(recipe, log, COMPILE)
    wait_for_step(run_dir / "losses_rank0.txt", 5, process, timeout=1800)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert max(step for step, _ in read_losses(run_dir / "losses_rank0.txt")) < max_steps
    assert run_fit(recipe, log, COMPILE, timeout=1800) == 0, log.read_text()[-3000:]
    assert "resuming from" in log.read_text()

    for rank in range(2):
        reference = final_losses(tmp_path / "reference" / "run" / f"losses_rank{rank}.txt")
        assert sorted(reference) == list(range(1, max_steps + 1))
        assert final_losses(run_dir / f"losses_rank{rank}.txt") == reference  # bitwise, as without compile
        eager = final_losses(tmp_path / "eager" / "run" / f"losses_rank{rank}.txt")
        for step, loss in reference.items():
            assert float.fromhex(loss) == pytest.approx(float.fromhex(eager[step]), rel=1e-4), step
