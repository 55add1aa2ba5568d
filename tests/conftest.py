"""Shared by the unit and end-to-end tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shimv2 import launcher

# What containerd runs (the e2e harness puts the venv's bin dir first on its PATH).
SHIM_BINARY = Path(sys.executable).parent / "containerd-shim-pyshim-v2"


@pytest.fixture(autouse=True, scope="session")
def _current_launcher() -> None:
    """The native launcher has the fork server version of the sources compiled
    in: after an edit it would quietly fall back to Python on every call, and
    the tests would not test the fast path. Rebuild it then (as make venv does)."""
    if SHIM_BINARY.exists():
        launcher.ensure_current(str(SHIM_BINARY))
