"""Container cgroups: stats, OOM watching, shim placement.

Spec: io-and-reaping.md §9 (OOM) and §10 (stats), shim-contract.md §4 step 9
(``shim_cgroup``). Stats are filled the way containerd 1.6's cgroups library
(github.com/containerd/cgroups v1.0.x/v1.1.0) fills them, so CRI and ``ctr``
read the same numbers as from the runc shim.

Only the standard library is imported at module level: ``move_to_cgroup`` runs
in ``start``, which must not import trio or protobuf (see manager.py). The
async watchers import trio, ``stats()`` imports the generated messages.
"""

from __future__ import annotations

import os

from .files import DEFAULT_ROOT, CgroupError, CgroupGone
from .files import _KvReader as _KvReader
from .paths import CgroupPaths, cgroup_paths, is_unified, parse_cgroup_file
from .placement import join_cgroups, move_to_cgroup
from .v1 import V1_TYPE_URL, CgroupV1, watch_oom_v1
from .v2 import V2_TYPE_URL, CgroupV2, watch_oom_v2

__all__ = [
    "DEFAULT_ROOT",
    "V1_TYPE_URL",
    "V2_TYPE_URL",
    "CgroupError",
    "CgroupGone",
    "CgroupPaths",
    "CgroupV1",
    "CgroupV2",
    "cgroup_paths",
    "detect",
    "is_unified",
    "join_cgroups",
    "move_to_cgroup",
    "parse_cgroup_file",
    "watch_oom_v1",
    "watch_oom_v2",
]


def detect(
    pid: int,
    cgroupfs_root: str = DEFAULT_ROOT,
    proc_root: str = "/proc",
    mountinfo: str | None = None,
) -> CgroupV1 | CgroupV2:
    """The cgroup of ``pid``, v2 in unified mode and v1 otherwise (as containerd decides).

    ``mountinfo`` defaults to ``<proc_root>/self/mountinfo``.
    """
    paths = cgroup_paths(pid, proc_root)
    if is_unified(cgroupfs_root, mountinfo or os.path.join(proc_root, "self", "mountinfo")):
        if paths.unified is None:
            raise CgroupError(f"pid {pid} has no cgroup2 (0::) entry")
        return CgroupV2(paths.unified, cgroupfs_root)
    if not paths.controllers:
        raise CgroupError(f"pid {pid} has no cgroup v1 entries")
    return CgroupV1(paths.controllers, cgroupfs_root, proc_root)
