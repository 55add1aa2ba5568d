"""Container cgroups, v1 and v2 behind one interface: stats, OOM watching, shim placement.

What belongs here is everything the shim reads from or writes to cgroupfs, and
nothing else (runc creates, updates, freezes and deletes the cgroups). Callers
use this package only: :class:`Cgroup` is the interface, :func:`detect` finds a
process's cgroup and returns the implementation for the host's hierarchy, and
the other public names are re-exported from the modules:

- ``v1``: :class:`CgroupV1`, a cgroup in the v1 hierarchies (one directory per
  controller), and its eventfd OOM watch (``cgroup.event_control``);
- ``v2``: :class:`CgroupV2`, a cgroup in the unified cgroup2 hierarchy, and its
  OOM watch on ``memory.events``;
- ``placement``: moving a process into cgroups (``shim_cgroup``, the fork
  server's children), either hierarchy;
- ``paths``: /proc/PID/cgroup and mountinfo parsing, v1 or v2 detection;
- ``files``: reading and writing cgroupfs files, the formats both versions
  share, the errors;
- ``inotify``: the inotify fd the v2 watch waits on.

Underscored names are private to the package: its modules share them, nothing
outside imports them.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .files import DEFAULT_ROOT, CgroupError, CgroupGone
from .paths import CgroupPaths, cgroup_paths, is_unified, parse_cgroup_file
from .placement import join_cgroups, move_to_cgroup
from .v1 import V1_TYPE_URL, CgroupV1, watch_oom_v1
from .v2 import V2_TYPE_URL, CgroupV2, watch_oom_v2

if TYPE_CHECKING:
    from shimv2.api.containerd.cgroups.v1 import metrics_pb2 as v1pb
    from shimv2.api.containerd.cgroups.v2 import metrics_pb2 as v2pb

__all__ = [
    "DEFAULT_ROOT",
    "V1_TYPE_URL",
    "V2_TYPE_URL",
    "Cgroup",
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


class Cgroup(Protocol):
    """A container's cgroup as the service uses it, whichever the hierarchy."""

    def exists(self) -> bool:
        """Whether the cgroup's directory (v1: any of them) is still there."""

    def stats(self) -> v1pb.Metrics | v2pb.Metrics:
        """The Metrics message of its version; raises CgroupGone once it is removed."""

    def oom_kills(self) -> int | None:
        """The kernel's OOM-kill count for the cgroup, None when it cannot be read."""

    async def watch_oom(self, on_oom: Callable[[], None]) -> None:
        """Call ``on_oom()`` on each OOM kill; return once nothing is left to watch."""

    def close(self) -> None:
        """Release the file descriptors it keeps (the container is gone)."""


if TYPE_CHECKING:  # mypy checks here that both classes implement the interface
    _V1_IS_A_CGROUP: type[Cgroup] = CgroupV1
    _V2_IS_A_CGROUP: type[Cgroup] = CgroupV2


def detect(
    pid: int,
    cgroupfs_root: str = DEFAULT_ROOT,
    proc_root: str = "/proc",
    mountinfo: str | None = None,
) -> CgroupV1 | CgroupV2:
    """The cgroup of ``pid``, v2 in unified mode and v1 otherwise (as containerd decides).

    Either class implements :class:`Cgroup`. ``mountinfo`` defaults to
    ``<proc_root>/self/mountinfo``.
    """
    paths = cgroup_paths(pid, proc_root)
    if is_unified(cgroupfs_root, mountinfo or os.path.join(proc_root, "self", "mountinfo")):
        if paths.unified is None:
            raise CgroupError(f"pid {pid} has no cgroup2 (0::) entry")
        return CgroupV2(paths.unified, cgroupfs_root)
    if not paths.controllers:
        raise CgroupError(f"pid {pid} has no cgroup v1 entries")
    return CgroupV1(paths.controllers, cgroupfs_root, proc_root)
