"""Where a process's cgroups are: /proc/PID/cgroup, the mount table, v1 or v2.

What belongs here: parsing ``/proc/<pid>/cgroup`` (:class:`CgroupPaths`) and
mountinfo, and telling a unified host (cgroup2 at the root) from a v1 or hybrid
one: the facts ``detect`` and placement decide on. No cgroupfs file is read here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .files import DEFAULT_ROOT, CgroupError


@dataclass(frozen=True)
class CgroupPaths:
    """A process's cgroups as /proc/<pid>/cgroup lists them."""

    # v1 hierarchy (controller, or "name=systemd") -> path; co-mounted
    # controllers ("cpu,cpuacct") each get their own key.
    controllers: Mapping[str, str]
    # The "0::" line: the cgroup2 path (unified mode, or hybrid's unified hierarchy).
    unified: str | None = None

    def get(self, controller: str) -> str | None:
        return self.controllers.get(controller) or self.controllers.get("name=" + controller)


def parse_cgroup_file(text: str) -> CgroupPaths:
    controllers: dict[str, str] = {}
    unified: str | None = None
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split(":", 2)  # the path itself may contain ':'
        if len(parts) != 3:
            raise CgroupError(f"invalid cgroup entry: {line!r}")
        _, names, path = parts
        if names == "":
            unified = path
            continue
        for name in names.split(","):
            controllers[name] = path
    return CgroupPaths(controllers, unified)


def cgroup_paths(pid: int, proc_root: str = "/proc") -> CgroupPaths:
    """Parse ``/proc/<pid>/cgroup``; OSError (FileNotFoundError) if the process is gone."""
    with open(os.path.join(proc_root, str(pid), "cgroup"), encoding="utf-8") as f:
        return parse_cgroup_file(f.read())


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo escapes spaces and the like as \\ooo."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


class _MountEntry(NamedTuple):
    point: str  # mount point
    root: str  # the directory of the filesystem mounted there
    fstype: str
    options: str  # super options (for cgroup v1: the controllers)


def _mount_entries(mountinfo: str) -> list[_MountEntry]:
    """Every line of a mountinfo file, in mount order."""
    out: list[_MountEntry] = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            # Optional fields (from the 7th on) end at "-"; fs type, source and
            # super options follow it.
            try:
                sep = fields.index("-", 6)
            except ValueError:
                continue
            if sep + 1 >= len(fields):
                continue
            options = fields[sep + 3] if sep + 3 < len(fields) else ""
            point = os.path.normpath(_unescape(fields[4]))
            out.append(_MountEntry(point, _unescape(fields[3]), fields[sep + 1], options))
    return out


def _mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, fs type) of every line of a mountinfo file, in mount order."""
    return [(m.point, m.fstype) for m in _mount_entries(mountinfo)]


def _fstype(path: str, mounts: list[tuple[str, str]]) -> str | None:
    """The type of the topmost mount exactly at ``path`` (later mounts shadow earlier)."""
    path = os.path.normpath(path)
    found = None
    for point, fstype in mounts:
        if point == path:
            found = fstype
    return found


def is_unified(cgroupfs_root: str = DEFAULT_ROOT, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """True when ``cgroupfs_root`` itself is a cgroup2 mount (containerd's ``Unified`` mode).

    Hybrid (v1 hierarchies plus cgroup2 at ``<root>/unified``) is not unified:
    containerd and runc keep containers in the v1 hierarchies there.
    """
    return _fstype(cgroupfs_root, _mounts(mountinfo)) == "cgroup2"
