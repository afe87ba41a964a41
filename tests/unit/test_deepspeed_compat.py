"""The DeepSpeed strategy refuses DeepSpeed and Lightning versions its overridden internals were not verified with."""

from __future__ import annotations

import pytest

from sdmoe_train.errors import ConfigError
from sdmoe_train.parallel import deepspeed_compat
from sdmoe_train.parallel.deepspeed import MoEDeepSpeedStrategy


def _installed(monkeypatch: pytest.MonkeyPatch, **versions: str | None) -> None:
    monkeypatch.setattr(deepspeed_compat, "_installed_version", lambda name: versions[name])


def test_the_verified_versions_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, deepspeed="0.19.8", lightning="2.6.6")
    deepspeed_compat.check_versions()


@pytest.mark.parametrize(
    ("deepspeed", "lightning", "found"),
    [
        ("0.20.0", "2.6.6", "deepspeed 0.20.0, lightning 2.6.6"),
        ("0.19.8", "2.7.0", "deepspeed 0.19.8, lightning 2.7.0"),
        (None, "2.6.6", "deepspeed not installed, lightning 2.6.6"),
    ],
)
def test_other_versions_are_refused_naming_both(
    monkeypatch: pytest.MonkeyPatch, deepspeed: str | None, lightning: str, found: str
) -> None:
    _installed(monkeypatch, deepspeed=deepspeed, lightning=lightning)
    with pytest.raises(ConfigError) as error:
        deepspeed_compat.check_versions()
    message = str(error.value)
    assert f"this environment has {found}" in message
    assert "verified with deepspeed 0.19.8 and lightning 2.6.6" in message
    assert "pip install deepspeed==0.19.8 lightning==2.6.6" in message


def test_the_strategy_checks_before_anything_is_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    _installed(monkeypatch, deepspeed="0.18.0", lightning="2.6.6")
    with pytest.raises(ConfigError, match="this environment has deepspeed 0.18.0"):
        MoEDeepSpeedStrategy(stage=2)
