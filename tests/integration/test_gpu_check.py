"""benchmarks/gpu_check.py runs end to end; on this CPU-only machine with the tiny presets in fp32."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the full check runs (minutes): `make gpu-check`")
def test_gpu_check_runs_on_cpu_and_reports_consistent_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    import gpu_check

    torch.set_num_threads(1)  # tiny tensors: a second intra-op thread only adds contention on a loaded machine
    gpu_check.main(["--steps", "2", "--warmup", "1", "--out", str(tmp_path / "gpu_check.json")])

    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result) == {
        "benchmark", "environment", "settings", "training", "moe_layer", "sdmoe", "compile", "lightning", "failed",
        "elapsed_s",
    }  # fmt: skip
    assert result["failed"] == []
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["devices"] == []
    for family, preset in (("qwen", "tiny_qwen_moe"), ("deepseek", "tiny_deepseek_moe")):
        row = result["training"][family]
        assert row["preset"] == preset and row["layers"] == 2
        assert row["tokens_per_step"] == 2 * 64
        assert row["tokens_per_sec"] == pytest.approx(row["tokens_per_step"] / (row["step_ms"] / 1e3), rel=1e-3)
        flops = row["training_flops_per_token"]["total"]
        assert row["tflops"] == pytest.approx(row["tokens_per_sec"] * flops / 1e12, rel=1e-2, abs=1e-3)
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # no peak and no CUDA allocator on CPU
        assert math.isfinite(row["first_loss"]) and row["first_loss"] == pytest.approx(math.log(512), rel=0.05)
        assert row["last_loss"] < row["first_loss"]  # it trains: the same batch, several AdamW steps
    moe = result["moe_layer"]
    assert moe["grouped_gemm_ms"] > 0 and moe["per_expert_loop_ms"] > 0 and moe["dtype"] == "float32"
    assert 0.5 < result["sdmoe"]["overhead_ratio"] < 5
    assert result["compile"] == {"skipped": "no GPU; pass --compile to run it"}
    perf = result["lightning"]["perf"]
    assert set(perf) == {"perf/tokens_per_sec_per_device", "perf/tflops_per_device"} and all(
        v > 0 for v in perf.values()
    )
    table = capsys.readouterr().out
    assert "tiny_deepseek_moe (2 layers)" in table and "SD-MoE training step: x" in table


def test_a_failing_part_is_reported_the_others_still_run_and_the_exit_status_is_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    def broken_compile(args: object) -> dict:
        raise RuntimeError("inductor: no C++ compiler")

    done = {"step_ms": 1.0, "tokens_per_sec": 1.0, "tflops": 1.0, "mfu": None, "peak_memory_gib": None}
    monkeypatch.setattr(
        gpu_check, "measure_training", lambda family, args, peak: {**done, "preset": family, "layers": 2}
    )
    monkeypatch.setattr(
        gpu_check,
        "measure_moe_layer",
        lambda args: {"grouped_gemm_ms": 1.0, "per_expert_loop_ms": 2.0, "loop_over_grouped": 2.0},
    )
    monkeypatch.setattr(gpu_check, "measure_sdmoe", lambda args: {"overhead_ratio": 1.01})
    monkeypatch.setattr(gpu_check, "measure_compile", broken_compile)
    monkeypatch.setattr(gpu_check, "lightning_fit", lambda args, peak, log_dir: {"perf": {}})

    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--compile", "--out", str(tmp_path / "gpu_check.json")])

    assert stopped.value.code == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["failed"] == ["compile"]
    assert result["compile"] == {"error": "RuntimeError: inductor: no C++ compiler"}
    assert result["sdmoe"] == {"overhead_ratio": 1.01} and result["lightning"] == {"perf": {}}
    captured = capsys.readouterr()
    assert "compile: failed: RuntimeError: inductor: no C++ compiler" in captured.out
    assert "1 part(s) failed: compile" in captured.err
