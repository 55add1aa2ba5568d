"""Unit tests run the shim's commands in-process or as subprocesses of their own:
never through a fork server that happens to run on this machine (the fork
server's own tests start private ones)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_fork_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSHIM_FORKSERVER", "0")
