"""The .deb installed for real on a test node, then a container run through it.

``apt-get install ./dist/pyshim_<version>_<arch>.deb`` changes the machine
(``/opt/pyshim``, ``/usr/bin/containerd-shim-pyshim-v2``) and uses the system
containerd, so it runs only where ``PYSHIM_NODE=1`` says the machine is a
throwaway test node (``make test-node`` sets it in the VM). Elsewhere
test_packaging.py covers the package with ``dpkg --root`` in a temp dir.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import shimv2

from .harness import wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.node,
    pytest.mark.skipif(
        os.environ.get("PYSHIM_NODE") != "1",
        reason="installs system-wide: only on a throwaway test node (PYSHIM_NODE=1)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
RUNTIME = "io.containerd.pyshim.v2"
LINK = Path("/usr/bin/containerd-shim-pyshim-v2")
NAMESPACE = "pyshim-node"


def sh(*argv: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert r.returncode == 0, f"{argv} rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def ctr(*args: str, timeout: float = 120) -> str:
    """ctr against the system containerd (its PATH finds the installed shim)."""
    return sh("ctr", "--namespace", NAMESPACE, *args, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    dist = tmp_path_factory.mktemp("dist")
    # pip fetches the dependencies; the emulated node is slow: generous limits
    sh(str(REPO / "packaging" / "build-deb.sh"), env={"OUT": str(dist)}, timeout=1800)
    (deb,) = dist.glob(f"pyshim_{shimv2.__version__}_*.deb")
    sh("apt-get", "install", "-y", "--no-install-recommends", str(deb),
       env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=600)  # fmt: skip
    yield deb
    sh("apt-get", "purge", "-y", "pyshim", env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
    assert not LINK.exists() and not LINK.is_symlink()


def test_deb_installed_runs_containers(installed: Path, rootfs: Path) -> None:
    assert LINK.resolve().is_relative_to("/opt/pyshim/releases")
    assert shimv2.__version__ in sh(str(LINK), "-v")
    sh("systemctl", "is-active", "containerd")
    cid = f"deb-{uuid.uuid4().hex[:8]}"
    out = ctr("run", "--rm", "--runtime", RUNTIME, "--rootfs", str(rootfs), cid,
              "/bin/sh", "-c", "echo hello from the deb", timeout=300)  # fmt: skip
    assert out.replace("\r", "") == "hello from the deb\n"

    # a detached task: its shim is the installed one
    ctr("run", "-d", "--runtime", RUNTIME, "--rootfs", str(rootfs), cid, "/bin/sleep", "600")
    try:

        def shims() -> list[psutil.Process]:
            return [
                p
                for p in psutil.process_iter(["cmdline"])
                if "-id" in (cmd := p.info["cmdline"] or []) and cid in cmd and "-address" in cmd
            ]

        (shim,) = wait_until(shims, 60, what=f"the shim of {cid}")
        assert shim.cmdline()[0].startswith("/opt/pyshim/"), shim.cmdline()
    finally:
        ctr("task", "kill", "-s", "SIGKILL", cid)
        wait_until(lambda: "STOPPED" in ctr("task", "ls"), 60, what=f"{cid} stopped", interval=0.2)
        ctr("task", "rm", cid)
        ctr("container", "rm", cid)
    wait_until(lambda: not shims(), 60, what=f"the shim of {cid} to exit")
