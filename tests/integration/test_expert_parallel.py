"""Expert parallelism on 2 gloo processes: ep_size=2 equals ep_size=1 in loss, gradients, updated weights and
monitoring statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration import expert_parallel_monitoring_runs, expert_parallel_runs


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].shape == tensor.shape, name
        if tensor.is_floating_point():
            torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(actual[name], tensor), name


# The SD-MoE case (replicated W_c, sharded W_u, bases refreshed every step) stays in the default suite.
@pytest.mark.parametrize("sdmoe", [pytest.param(False, marks=pytest.mark.slow), True], ids=["vanilla", "sdmoe"])
def test_two_rank_expert_parallel_steps_equal_one_process_on_the_global_batch(tmp_path: Path, sdmoe: bool) -> None:
    ranks = expert_parallel_runs.spawn_run(tmp_path, ep_size=2, sdmoe=sdmoe)
    single = expert_parallel_runs.single_process_run(sdmoe)
    for record in ranks:
        # The router and RoPE compute in fp32 inside the fp64 model, hence fp32-level tolerances.
        _assert_close(record["first_step"], single["first_step"], atol=1e-7)
        _assert_close(record["state"], single["state"], atol=1e-6)
        # Monitoring sees every expert on every rank, from gathered rank-3 factors.
        assert record["factors"].keys() == single["factors"].keys()
        for key, low_rank_EMN in single["factors"].items():
            assert low_rank_EMN.shape[0] == 8
            torch.testing.assert_close(record["factors"][key], low_rank_EMN, atol=1e-5, rtol=0, msg=str(key))
    expert_weights = [name for name in single["state"] if name.endswith(("up_proj", "up_proj_unique"))]
    assert expert_weights and all(single["state"][name].shape[0] == 8 for name in expert_weights)
    biases = [tensor for name, tensor in single["state"].items() if name.endswith("selection_bias")]
    assert any(bias.abs().max() > 0 for bias in biases)


# As above: SD-MoE (overlap of proxies and unique parts) in the default suite, the vanilla model marked slow.
@pytest.mark.parametrize("sdmoe", [pytest.param(False, marks=pytest.mark.slow), True], ids=["vanilla", "sdmoe"])
def test_monitors_on_two_expert_parallel_ranks_measure_all_experts_like_one_process(
    tmp_path: Path, sdmoe: bool
) -> None:
    ranks = expert_parallel_monitoring_runs.spawn_measurements(tmp_path, sdmoe)
    expected = expert_parallel_monitoring_runs.single_process_measurements(sdmoe)
    first, twin = expert_parallel_monitoring_runs.TWIN_EXPERTS
    # Identical experts 0 and 5 live on different ranks: only a comparison across ranks sees them match.
    overlap_figures = expected["overlap_full"][1]
    assert {name.split("/")[1].split("_")[0] for name in overlap_figures} == (
        {"proxy", "unique"} if sdmoe else {"proxy"}
    )
    for name, similarity_EE in {**overlap_figures, **expected["gradient"][1]}.items():
        assert similarity_EE.shape == (8, 8), name
        assert similarity_EE[first, twin] == pytest.approx(1.0, abs=1e-6), name  # fp32 gradient sums
    for record in ranks:
        for monitor, (scalars, figures) in expected.items():
            actual_scalars, actual_figures = record[monitor]
            # The load-balancing loss is a product of two batch means: a mean over ranks is not global.
            comparable = {name for name in scalars if "load_balance_loss" not in name}
            assert actual_scalars.keys() == scalars.keys() and len(comparable) > 4, monitor
            for name in sorted(comparable):
                assert actual_scalars[name] == pytest.approx(scalars[name], abs=1e-6), name
            assert actual_figures.keys() == figures.keys(), monitor
            for name, values in figures.items():
                torch.testing.assert_close(actual_figures[name], values, atol=1e-6, rtol=0, msg=name)
