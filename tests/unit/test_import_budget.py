"""``start`` and ``delete`` run on containerd's critical path: they must stay import-light.

containerd waits for ``start`` before it can dial the shim; importing trio alone
costs ~100 ms here. These tests run each action's module set in a fresh
interpreter and check what got imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("trio", "google.protobuf", "psutil")


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY))


def test_start_path_imports_neither_trio_nor_protobuf() -> None:
    modules = imported_after("import shimv2.cli, shimv2.manager")
    assert heavy(modules) == []


def test_delete_path_does_not_import_trio() -> None:
    # delete needs protobuf for its DeleteResponse, but no event loop.
    code = (
        "import shimv2.manager, shimv2.runccmd, shimv2.mount\n"
        "from shimv2.api.containerd.task.v2 import shim_pb2"
    )
    assert not any(m == "trio" or m.startswith("trio.") for m in imported_after(code))
