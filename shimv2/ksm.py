"""Opt-in kernel samepage merging (KSM) of a shim daemon's own private pages.

Every daemon is a fork of the same fork server and runs the same code, so most
of what it copied on write (reference counts CPython wrote into frozen objects,
malloc'd state, libpython's data) ends up byte-identical to its siblings' copy,
or to the server's again. Where the node runs ``ksmd``
(``/sys/kernel/mm/ksm/run`` = 1), marking those mappings ``MADV_MERGEABLE``
lets the kernel keep one copy of each such page for all of them.

Only this process's private writable mappings are marked ([heap], pymalloc's
arenas, anonymous mmaps, the copied-on-write data of the libraries), one
``madvise`` per mapping: never process-wide ``PR_SET_MEMORY_MERGE``, and
nothing survives an ``execve`` (runc, the containers and ``binary://``
loggers start unmarked). Off unless ``PYSHIM_KSM=1`` is in containerd's
environment (``enabled``); the fork server marks itself when it starts with
it, so that its daemons inherit the marks and merge with its pages too, and a
daemon marks what it mapped since (``Marker.mark``) once it went quiet.

The trade-off (docs/design.md has the figures): pages are shared only among
processes that opted in (root's shim daemons and their fork server), but
merging is what KSM side channels (timing a write to a merged page) need;
ksmd's CPU grows with the number of pages it scans.

Pure parsing and one libc call: no trio, no protobuf (the fork server uses it).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Mapping

from shimv2.libc import libc

ENV = "PYSHIM_KSM"  # "1" / "on" / "true" / "yes" in containerd's environment
SYSFS = "/sys/kernel/mm/ksm"
MADV_MERGEABLE = 12  # <asm-generic/mman-common.h>
# Special mappings that are never ours to merge (the stack changes at every call).
_SKIP = ("[stack]", "[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]", "[uprobes]")

libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.restype = ctypes.c_int


def enabled(environ: Mapping[str, str]) -> bool:
    """The node operator opted in (containerd's environment reaches every shim)."""
    return environ.get(ENV, "").strip().lower() in ("1", "on", "true", "yes")


def node_runs_ksm(sysfs: str = SYSFS) -> bool:
    """ksmd scans (run = 1); marks cost nothing but are useless otherwise."""
    try:
        with open(os.path.join(sysfs, "run")) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def parse_maps(text: str) -> list[tuple[int, int, str, str]]:
    """``/proc/PID/maps`` as (start, end, perms, path); path is "" for anonymous."""
    regions = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5 or "-" not in fields[0]:
            continue
        start, _, end = fields[0].partition("-")
        try:
            regions.append(
                (int(start, 16), int(end, 16), fields[1], fields[5] if len(fields) > 5 else "")
            )
        except ValueError:
            continue
    return regions


def mergeable(regions: list[tuple[int, int, str, str]]) -> list[tuple[int, int]]:
    """The ranges worth marking: private and writable ("rw?p"), not the stack nor
    the kernel's special mappings, not device files. A file-backed one counts:
    only its copied-on-write pages are anonymous, and only those ever merge."""
    ranges = []
    for start, end, perms, path in regions:
        if len(perms) < 4 or perms[0] != "r" or perms[1] != "w" or perms[3] != "p":
            continue
        if path.startswith(_SKIP) or path.startswith("[stack:") or path.startswith("/dev/"):
            continue
        if end > start:
            ranges.append((start, end))
    return ranges


class Marker:
    """Marks this process's mergeable mappings, each range once: ``mark`` again
    after new arenas or a grown heap only costs a read of /proc/self/maps."""

    def __init__(self, maps: str = "/proc/self/maps") -> None:
        self.maps = maps
        self.marked: set[tuple[int, int]] = set()
        self.failed: OSError | None = None  # a kernel without KSM: stop trying

    def mark(self) -> int:
        """Mark what is new since the last call; bytes newly marked."""
        if self.failed is not None:
            return 0
        try:
            with open(self.maps) as f:
                ranges = mergeable(parse_maps(f.read()))
        except OSError as exc:
            self.failed = exc
            return 0
        done = 0
        marked = set()
        for start, end in ranges:
            if (start, end) in self.marked:
                marked.add((start, end))
                continue
            if libc.madvise(start, end - start, MADV_MERGEABLE) != 0:
                err = ctypes.get_errno()
                if err in (errno.EINVAL, errno.ENOSYS):  # no CONFIG_KSM
                    self.failed = OSError(err, f"madvise(MADV_MERGEABLE): {os.strerror(err)}")
                    return done
                continue  # ENOMEM: unmapped meanwhile; EAGAIN: try again next time
            marked.add((start, end))
            done += end - start
        self.marked = marked  # ranges gone since (unmapped, merged) are forgotten
        return done
