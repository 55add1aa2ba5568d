"""Bad input reaches the client as a clear error, and leaves nothing behind (pyshim).

These exercise pyshim's own error paths, which have no Go-shim equivalent to
compare with (the Go shim gets its runc binary from runc Options, a type ctr
only builds for io.containerd.runc.*), so they run for pyshim only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import Containerd

pytestmark = pytest.mark.e2e

PYSHIM = "io.containerd.pyshim.v2"


def test_missing_runc_binary(
    containerd: Containerd, rootfs: Path, cid: str, tmp_path: Path
) -> None:
    # CRI-style runtime options: runtimeoptions.v1.Options pointing at a TOML file.
    config = tmp_path / "pyshim.toml"
    config.write_text('BinaryName = "/nonexistent/runc"\n')
    r = containerd.ctr(
        "run", "--runtime", PYSHIM, "--runtime-config-path", str(config),
        "--rm", "--rootfs", str(rootfs), cid, "/bin/true",
        timeout=30,
    )  # fmt: skip
    assert r.returncode != 0
    assert "OCI runtime create failed" in r.stderr, r.stderr
    assert "/nonexistent/runc" in r.stderr, r.stderr
    containerd.ctr("container", "rm", cid, timeout=15)
    containerd.assert_no_leaks(cid)


def test_bad_runtime_config(containerd: Containerd, rootfs: Path, cid: str, tmp_path: Path) -> None:
    config = tmp_path / "pyshim.toml"
    config.write_text("SystemdCgroup = 'yes'\n")  # must be a bool
    r = containerd.ctr(
        "run", "--runtime", PYSHIM, "--runtime-config-path", str(config),
        "--rm", "--rootfs", str(rootfs), cid, "/bin/true",
        timeout=30,
    )  # fmt: skip
    assert r.returncode != 0
    assert "SystemdCgroup" in r.stderr and "invalid argument" in r.stderr, r.stderr
    containerd.ctr("container", "rm", cid, timeout=15)
    containerd.assert_no_leaks(cid)


def test_missing_binary_in_container(containerd: Containerd, rootfs: Path, cid: str) -> None:
    r = containerd.ctr(
        "run", "--runtime", PYSHIM, "--rm", "--rootfs", str(rootfs), cid, "/no/such/binary",
        timeout=30,
    )  # fmt: skip
    assert r.returncode != 0
    assert "/no/such/binary" in r.stderr, r.stderr
    containerd.ctr("container", "rm", cid, timeout=15)
    containerd.assert_no_leaks(cid)
