"""HF export of a checkpoint with SSMoE: refused with a clear message unless the spectral routers are dropped."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from sdmoe_train.cli import main
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models import presets
from sdmoe_train.moe.sdmoe import SDMoEConfig
from sdmoe_train.moe.ssmoe_router import SSMoEConfig, set_spectral_blend

pytest.importorskip("safetensors")


def test_ssmoe_checkpoint_export_is_refused_unless_dropped_and_then_routes_as_c_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdmoe_train.interop.hf.driver import import_model

    config = presets.tiny_qwen_moe()
    config.n_layers, config.vocab_size, config.max_seq_len = 2, 64, 32
    config.hidden_dim, config.dense_hidden_dim, config.moe.expert_hidden_dim = 64, 64, 32
    module = PretrainModule(config, sdmoe=SDMoEConfig(enabled=True, rank=2), ssmoe=SSMoEConfig(enabled=True, c=0.5))
    module.configure_model()
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": importlib.metadata.version("lightning"),
    }
    ckpt = tmp_path / "ssmoe.ckpt"
    torch.save(checkpoint, ckpt)

    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "SSMoE spectral routers (ssmoe.enabled=true, c=0.5)" in error and "--drop_ssmoe" in error
    assert not (tmp_path / "hf").exists()

    main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf", "--drop_ssmoe"])
    tokens = torch.randint(0, 64, (2, 12))
    set_spectral_blend(module.model, 0.0)
    with torch.no_grad():
        expected = module.eval()(tokens)
        exported = import_model(tmp_path / "hf").eval()(tokens).logits
    torch.testing.assert_close(exported, expected)
