"""``isolation: strict`` resolved into a tool's profile (no Bun here; the behaviour is
tested end to end in tests/test_isolation.py)."""

from __future__ import annotations

from typing import Any

import pytest

from toolq.config.settings import Settings
from toolq.workers.profile import Profiles


def profiles(**config: Any) -> Profiles:
    settings = Settings.model_validate(config)
    return Profiles(settings, warm_available=settings.uses_warm_mode)


def test_a_strict_tool_gets_a_process_per_call() -> None:
    resolved = profiles(tools={"payments": {"isolation": "strict", "mode": "warm"}})
    assert resolved["payments"].mode == "spawn"  # strict wins over an explicit warm
    assert resolved["weather"].mode == "warm"


def test_runtime_wide_strict_and_a_tool_that_opts_back_in() -> None:
    everything = profiles(runtime={"isolation": "strict"})
    assert everything["weather"].mode == "spawn"
    assert not everything.settings.uses_warm_mode  # no warm pool is started for nothing
    opted = profiles(runtime={"isolation": "strict"}, tools={"cache": {"isolation": "standard"}})
    assert opted["cache"].mode == "warm" and opted["weather"].mode == "spawn"
    assert opted.settings.uses_warm_mode


def test_isolation_takes_only_known_values() -> None:
    with pytest.raises(ValueError, match="isolation"):
        Settings.model_validate({"runtime": {"isolation": "paranoid"}})
