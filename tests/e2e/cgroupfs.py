"""What the e2e tests read from this host's cgroups, on either hierarchy.

Development machines here are cgroup v1 (hybrid) without systemd; a test node
(``make test-node``) is systemd with the unified cgroup v2 hierarchy. The tests
assert the same behaviour on both and read the files each one has.
"""

from __future__ import annotations

import os
from pathlib import Path

from shimv2 import cgroups
from shimv2.container import systemd_running

ROOT = Path(cgroups.DEFAULT_ROOT)
#: containers live in the unified hierarchy (containerd's and runc's test)
UNIFIED = cgroups.is_unified()
#: systemd is PID 1 here (runc's test); only then can runc use its cgroup driver
SYSTEMD = systemd_running()


def cgroup_dir(pid: int, controller: str) -> Path:
    """The directory of *pid*'s cgroup that holds *controller*'s files."""
    paths = cgroups.cgroup_paths(pid)
    if UNIFIED:
        assert paths.unified is not None, f"pid {pid} has no cgroup2 entry"
        return ROOT / paths.unified.lstrip("/")
    path = paths.get(controller)
    assert path is not None, f"pid {pid} has no {controller} cgroup"
    return ROOT / controller / path.lstrip("/")


def cgroup_path(pid: int, controller: str = "memory") -> str:
    """*pid*'s cgroup as /proc/<pid>/cgroup names it (the unified one, or *controller*'s)."""
    paths = cgroups.cgroup_paths(pid)
    path = paths.unified if UNIFIED else paths.get(controller)
    assert path is not None, f"pid {pid} has no {controller} cgroup"
    return path


def read_limit(pid: int, controller: str, v1_file: str, v2_file: str) -> str:
    """A limit file of *pid*'s cgroup: *v1_file* under cgroup v1, *v2_file* under v2."""
    name = v2_file if UNIFIED else v1_file
    return (cgroup_dir(pid, controller) / name).read_text().strip()


def make_cgroup(name: str, v1_controllers: tuple[str, ...]) -> list[Path]:
    """Create cgroup *name* (absolute) in the unified root, or in each v1 hierarchy given."""
    rel = name.lstrip("/")
    dirs = [ROOT / rel] if UNIFIED else [ROOT / c / rel for c in v1_controllers]
    for d in dirs:
        d.mkdir()
    return dirs


def exists_anywhere(rel: str) -> list[Path]:
    """Every cgroup directory named *rel* (relative to a hierarchy's root) that exists."""
    roots = [ROOT] if UNIFIED else [p for p in ROOT.iterdir() if p.is_dir()]
    return [r / rel for r in roots if os.path.isdir(r / rel)]


def frozen(pid: int) -> bool:
    """The freezer state of *pid*'s cgroup (v2: ``cgroup.events``; v1: ``freezer.state``)."""
    d = cgroup_dir(pid, "freezer")
    if UNIFIED:
        events = dict(line.split() for line in (d / "cgroup.events").read_text().splitlines())
        return events["frozen"] == "1"
    return (d / "freezer.state").read_text().strip() == "FROZEN"
