"""Fixtures the unit tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import remote as remote_mod


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_CONFIG_HOME in tmp_path, no HVAGENT_REMOTE; the remotes file's path."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(remote_mod.ENV_REMOTE, raising=False)
    return tmp_path / "config" / "hvagent" / "remotes.yaml"
