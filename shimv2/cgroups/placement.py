"""Putting a process into cgroups, on either hierarchy (runc places containers).

What belongs here: ``move_to_cgroup`` (``start`` puts the shim into the
``shim_cgroup`` option's cgroup) and ``join_cgroups`` (a fork server's child
takes over the cgroups of the ``start`` that asked for it). Both run on the
``start`` path: the standard library only.
"""

from __future__ import annotations

import os

from .files import DEFAULT_ROOT, CgroupError, _write
from .paths import _fstype, _mount_entries, _mounts


def move_to_cgroup(
    pid: int,
    path: str,
    cgroupfs_root: str = DEFAULT_ROOT,
    mountinfo: str = "/proc/self/mountinfo",
) -> list[str]:
    """Put ``pid`` into the static cgroup ``path`` (the ``shim_cgroup`` option).

    Unified: ``<root>/<path>/cgroup.procs``. Otherwise: that file in every v1
    hierarchy mounted directly under the root where the directory exists
    (the unified hierarchy of a hybrid setup is left alone, as containerd does).
    Returns the files written; CgroupError if there was none or a write failed.
    """
    root = os.path.normpath(cgroupfs_root)
    rel = path.strip("/")
    mounts = _mounts(mountinfo)
    if _fstype(root, mounts) == "cgroup2":
        bases = [root]
    else:
        bases = sorted(
            {p for p, fstype in mounts if fstype == "cgroup" and os.path.dirname(p) == root}
        )
    written: list[str] = []
    for base in bases:
        d = os.path.join(base, rel) if rel else base
        if not os.path.isdir(d):
            continue
        target = os.path.join(d, "cgroup.procs")
        try:
            _write(target, str(pid))
        except OSError as e:
            raise CgroupError(f"cannot move pid {pid} into {target}: {e.strerror}") from e
        written.append(target)
    if not written:
        raise CgroupError(f"cgroup {path!r} does not exist under {root} (looked in {bases})")
    return written


def _cgroup_mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, root inside the hierarchy, names) of every cgroup mount; names
    are the v1 controllers / ``name=...`` of the mount, or {""} for cgroup2."""
    return [
        (m.point, m.root, {""} if m.fstype == "cgroup2" else set(m.options.split(",")))
        for m in _mount_entries(mountinfo)
        if m.fstype in ("cgroup", "cgroup2")
    ]


def join_cgroups(
    cgroup_file: str,
    pid: int = 0,
    mountinfo: str = "/proc/self/mountinfo",
    own_cgroup_file: str = "/proc/self/cgroup",
) -> None:
    """Move ``pid`` (default: ourselves) into the cgroups another process's
    ``/proc/PID/cgroup`` text lists, hierarchy by hierarchy (the fork server's
    children take over the cgroups of the ``start`` that asked for them)."""
    pid = pid or os.getpid()
    mine = {
        line.split(":", 2)[1]: line.split(":", 2)[2]
        for line in _read_required(own_cgroup_file).splitlines()
        if line.count(":") >= 2
    }
    mounts = _cgroup_mounts(mountinfo)
    for line in cgroup_file.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, path = parts
        if mine.get(names) == path:
            continue
        wanted = set(names.split(",")) if names else {""}
        for point, root, mount_names in mounts:
            if not wanted <= mount_names:
                continue
            rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
            if rel.startswith(".."):
                raise CgroupError(f"cgroup {path} is outside the mount {point}")
            target = os.path.join(point, rel, "cgroup.procs")
            try:
                _write(target, str(pid))
            except OSError as e:
                raise CgroupError(f"cannot move pid {pid} into {target}: {e.strerror}") from e
            break
        else:
            raise CgroupError(f"no mount for cgroup hierarchy {names or 'cgroup2'!r}")


def _read_required(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
