"""The cgroup driver: systemd's where systemd runs, cgroupfs elsewhere.

A ``slice:prefix:name`` cgroupsPath (what CRI writes for a ``.slice`` parent,
``ctr run --cgroup``) asks pyshim for runc's systemd driver only where systemd
runs; an explicit ``SystemdCgroup`` option always decides. On a host without
systemd (these development machines) both shims run such a container with the
cgroupfs driver, which takes the path as a plain cgroup name (critest asks for
a ``/test.slice`` parent there). On a systemd node (``make test-node``) the
container gets its transient ``<prefix>-<name>.scope`` in the slice, with the
limits set on the unit, and the scope goes with the container.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .cgroupfs import ROOT, SYSTEMD, UNIFIED, cgroup_path, exists_anywhere
from .harness import RUNNING, RUNTIMES, STOPPED, Containerd, wait_until
from .test_pause_update import RESOURCES_URL, update

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def run_task(c: Containerd, runtime: str, rootfs: Path, cid: str, *args: str) -> int:
    r = c.ctr(
        "run", "-d", "--runtime", runtime, *args, "--rootfs", str(rootfs), cid,
        "/bin/sleep", "600",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    c.wait_task_status(cid, RUNNING, timeout=30)
    pid = c.task_pid(cid)
    assert pid
    return pid


def remove_task(c: Containerd, cid: str) -> None:
    c.ctr("task", "kill", "-s", "SIGKILL", cid)
    c.wait_task_status(cid, STOPPED, timeout=30)
    assert c.ctr("task", "rm", cid).returncode == 0
    assert c.ctr("container", "rm", cid).returncode == 0
    c.assert_no_leaks(cid, timeout=30)


@pytest.mark.skipif(SYSTEMD, reason="systemd runs here: the path selects its driver")
def test_slice_path_without_systemd_is_a_cgroupfs_name(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    path = f"test.slice:pyshim:{cid}"
    pid = run_task(containerd, runtime, rootfs, cid, "--cgroup", path)
    # runc's cgroupfs driver made a cgroup of that very name
    actual = cgroup_path(pid)
    assert actual.endswith("/" + path), actual
    if runtime == RUNTIMES["pyshim"]:
        effective = json.loads((containerd.bundle_dir(cid) / "options.json").read_text())
        assert "systemd_cgroup" not in effective, effective
    remove_task(containerd, cid)
    wait_until(lambda: not exists_anywhere(actual.lstrip("/")), 30, what=f"{actual} removed")


def systemctl(*args: str) -> str:
    r = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
    return r.stdout.strip()


@pytest.mark.node
@pytest.mark.skipif(
    not (SYSTEMD and UNIFIED), reason="needs systemd as PID 1 and cgroup v2 (make test-node)"
)
@pytest.mark.parametrize(
    ("shim", "how"),
    [("go", "option"), ("pyshim", "option"), ("pyshim", "path")],
    ids=["go-option", "pyshim-option", "pyshim-path"],
)
def test_systemd_driver_scope(
    containerd: Containerd, rootfs: Path, cid: str, tmp_path: Path, shim: str, how: str
) -> None:
    runtime = RUNTIMES[shim]
    args = ["--cgroup", f"system.slice:pyshim:{cid}", "--memory-limit", str(128 * MiB)]
    if how == "option" and shim == "go":
        args.append("--runc-systemd-cgroup")  # runc Options; ctr allows it for runc only
    elif how == "option":
        config = tmp_path / "pyshim.toml"  # runtimeoptions naming a TOML file, as CRI sends
        config.write_text("SystemdCgroup = true\n")
        args += ["--runtime-config-path", str(config)]
    # "path": no option at all, the slice path and a running systemd decide
    pid = run_task(containerd, runtime, rootfs, cid, *args)
    unit = f"pyshim-{cid}.scope"
    scope = f"/system.slice/{unit}"
    assert cgroup_path(pid) == scope
    scope_dir = ROOT / scope.lstrip("/")
    assert str(pid) in (scope_dir / "cgroup.procs").read_text().split()
    assert systemctl("is-active", unit) == "active"
    assert systemctl("show", "-p", "MemoryMax", "--value", unit) == str(128 * MiB)

    # Update goes through the systemd driver too: the unit's properties and the files
    resources = {"memory": {"limit": 64 * MiB}, "pids": {"limit": 42}}
    update(containerd, cid, RESOURCES_URL, json.dumps(resources).encode())
    assert (scope_dir / "memory.max").read_text().strip() == str(64 * MiB)
    assert (scope_dir / "pids.max").read_text().strip() == "42"
    assert systemctl("show", "-p", "MemoryMax", "--value", unit) == str(64 * MiB)
    assert systemctl("show", "-p", "TasksMax", "--value", unit) == "42"

    remove_task(containerd, cid)
    wait_until(lambda: not scope_dir.exists(), 30, what=f"{scope_dir} removed")
    wait_until(lambda: systemctl("is-active", unit) != "active", 30, what=f"{unit} stopped")
