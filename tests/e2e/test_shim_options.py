"""Shim-level options applied by ``start`` (pyshim): the shim cgroup and oom_score_adj.

``ctr --runtime-config-path`` sends ``runtimeoptions.v1.Options`` pointing at a
TOML file, exactly what CRI sends to a non-runc runtime; ``ShimCgroup`` there
must put the daemon into that (pre-created) cgroup, as containerd's
TestShimInCgroup checks, and the daemon's oom_score_adj must be containerd's + 1
(TestShimOOMScore).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cgroupfs import make_cgroup
from .harness import RUNNING, STOPPED, Containerd

pytestmark = pytest.mark.e2e

PYSHIM = "io.containerd.pyshim.v2"


@pytest.fixture
def shim_cgroup_dirs() -> Iterator[list[Path]]:
    """A fresh cgroup, in the unified hierarchy or in some v1 hierarchies (as
    containerd's test pre-creates it); its name is the dirs' common tail."""
    name = f"/pyshim-shim-{uuid.uuid4().hex[:8]}"
    made = make_cgroup(name, ("devices", "pids", "memory"))
    yield made
    for path in made:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@pytest.mark.node
def test_shim_cgroup_and_oom_score(
    containerd: Containerd, rootfs: Path, cid: str, tmp_path: Path, shim_cgroup_dirs: list[Path]
) -> None:
    shim_cgroup = "/" + shim_cgroup_dirs[0].name
    config = tmp_path / "pyshim.toml"
    config.write_text(f'ShimCgroup = "{shim_cgroup}"\n')
    r = containerd.ctr(
        "run", "-d", "--runtime", PYSHIM, "--runtime-config-path", str(config),
        "--rootfs", str(rootfs), cid, "/bin/sleep", "600",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    containerd.wait_task_status(cid, RUNNING, timeout=10)
    shims = containerd.shim_processes(cid)
    assert len(shims) == 1, shims
    shim_pid = shims[0].pid
    for d in shim_cgroup_dirs:
        assert str(shim_pid) in (d / "cgroup.procs").read_text().split(), f"shim not in {d}"
    containerd_pid = containerd.pid
    assert containerd_pid
    ours = int(Path(f"/proc/{containerd_pid}/oom_score_adj").read_text())
    shim = int(Path(f"/proc/{shim_pid}/oom_score_adj").read_text())
    assert shim == min(ours + 1, 1000)
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    containerd.ctr("task", "rm", cid)
    containerd.ctr("container", "rm", cid)
    containerd.assert_no_leaks(cid)
    assert all(os.path.isdir(d) for d in shim_cgroup_dirs)


def test_no_pivot_from_legacy_create_options(
    containerd: Containerd, rootfs: Path, cid: str
) -> None:
    # ctr 1.6 sends containerd.linux.runc.CreateOptions{no_pivot_root} to non-runc runtimes.
    r = containerd.ctr(
        "run", "-d", "--no-pivot", "--runtime", PYSHIM, "--rootfs", str(rootfs), cid,
        "/bin/sleep", "600",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    containerd.wait_task_status(cid, RUNNING, timeout=10)
    effective = json.loads((containerd.bundle_dir(cid) / "options.json").read_text())
    assert effective.get("no_pivot_root") is True, effective
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    containerd.ctr("task", "rm", cid)
    containerd.ctr("container", "rm", cid)
    containerd.assert_no_leaks(cid)
