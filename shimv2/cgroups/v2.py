"""cgroup v2: a container's cgroup as one directory of the unified hierarchy.

What belongs here: :class:`CgroupV2` (stats as ``io.containerd.cgroups.v2.Metrics``,
the OOM-kill count from ``memory.events``), the readers of files only v2 has
(PSI ``*.pressure``, ``io.stat``, ``hugetlb.*.current``/``max``), and its OOM
watch: inotify on ``memory.events`` and ``cgroup.events``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from .files import (
    _GONE_ERRNOS,
    _MAX_UINT64,
    DEFAULT_ROOT,
    CgroupGone,
    _kv_file,
    _KvReader,
    _parse_uint,
    _rdma_entries,
    _read,
)
from .inotify import _drain, _inotify_fd

if TYPE_CHECKING:
    from shimv2.api.containerd.cgroups.v2 import metrics_pb2 as v2pb

# The bare type URLs containerd and CRI expect in StatsResponse.stats (task-api.md §3.14).
V2_TYPE_URL = "io.containerd.cgroups.v2.Metrics"


def _uint_or_max(path: str) -> int:
    """v2 single-value files: ``max`` is the maximum uint64; missing or garbage is 0."""
    text = _read(path)
    if text is None:
        return 0
    if text.strip() == "max":
        return _MAX_UINT64
    try:
        return _parse_uint(text)
    except ValueError:
        return 0


# memory.stat keys, which are also the v2 MemoryStat field names 1-31.
_V2_MEMORY_KEYS = (
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
    "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file",
    "active_file", "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault",
    "pgmajfault", "workingset_refault", "workingset_activate", "workingset_nodereclaim",
    "pgrefill", "pgscan", "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree",
    "pglazyfreed", "thp_fault_alloc", "thp_collapse_alloc",
)  # fmt: skip
_V2_CPU_KEYS = (
    "usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec",
)  # fmt: skip
_V2_MEMORY_EVENTS = ("low", "high", "max", "oom", "oom_kill")
_IO_KEYS = ("rbytes", "wbytes", "rios", "wios")


class CgroupV2:
    """A container's cgroup in a unified (cgroup2) hierarchy mounted at ``root``."""

    version = 2
    type_url = V2_TYPE_URL

    def __init__(self, path: str, root: str = DEFAULT_ROOT) -> None:
        self.path = path
        self.root = root
        self.dir = os.path.join(root, path.lstrip("/"))
        self._memory_events = _KvReader(os.path.join(self.dir, "memory.events"))

    def close(self) -> None:
        """The container is gone: release the kept file descriptors."""
        self._memory_events.close()

    def __repr__(self) -> str:
        return f"CgroupV2({self.path!r}, root={self.root!r})"

    def exists(self) -> bool:
        return os.path.isdir(self.dir)

    def stats(self) -> v2pb.Metrics:
        """``io.containerd.cgroups.v2.Metrics``; raises CgroupGone if the directory is gone.

        As in the library, ``pids``, ``cpu``, ``memory``, ``io`` and ``rdma`` are
        always present (zeros for missing files), ``memory_events`` only when
        ``memory.events`` has content, and cpu.stat / memory.stat are only read
        when their controller is enabled for the cgroup. Like cgroups v3.0.3+
        (containerd 2.x, Debian's 1.7), also the peaks (``memory.peak``,
        ``memory.swap.peak``) and the PSI figures of the ``*.pressure`` files.
        """
        from shimv2.api.containerd.cgroups.v2 import metrics_pb2 as pb

        d = self.dir
        text = _read(os.path.join(d, "cgroup.controllers"))
        if text is None:
            if not os.path.isdir(d):
                raise CgroupGone(f"cgroup does not exist: {self!r}")
            text = ""
        raw: dict[str, int] = {}
        for controller in ("cpu", "memory"):
            if controller in text.split():
                raw.update(_kv_file(os.path.join(d, controller + ".stat")) or {})

        m = pb.Metrics()
        m.pids.SetInParent()
        m.pids.current = _uint_or_max(os.path.join(d, "pids.current"))
        m.pids.limit = _uint_or_max(os.path.join(d, "pids.max"))
        m.cpu.SetInParent()
        for key in _V2_CPU_KEYS:
            setattr(m.cpu, key, raw.get(key, 0))
        ms = m.memory
        ms.SetInParent()
        for key in _V2_MEMORY_KEYS:
            setattr(ms, key, raw.get(key, 0))
        ms.usage = _uint_or_max(os.path.join(d, "memory.current"))
        ms.usage_limit = _uint_or_max(os.path.join(d, "memory.max"))
        ms.swap_usage = _uint_or_max(os.path.join(d, "memory.swap.current"))
        ms.swap_limit = _uint_or_max(os.path.join(d, "memory.swap.max"))
        # Linux 5.19+ (memory.peak) and 6.5+ (memory.swap.peak); 0 before.
        ms.max_usage = _uint_or_max(os.path.join(d, "memory.peak"))
        ms.swap_max_usage = _uint_or_max(os.path.join(d, "memory.swap.peak"))
        for psi, name in (
            (m.cpu.psi, "cpu.pressure"),
            (ms.psi, "memory.pressure"),
            (m.io.psi, "io.pressure"),
        ):
            _fill_psi(psi, os.path.join(d, name))
        events = _kv_file(os.path.join(d, "memory.events"))
        if events:
            for key in _V2_MEMORY_EVENTS:
                setattr(m.memory_events, key, events.get(key, 0))
        m.io.SetInParent()
        m.io.usage.extend(_io_entries(_read(os.path.join(d, "io.stat")) or ""))
        m.rdma.SetInParent()
        for entries, name in ((m.rdma.current, "rdma.current"), (m.rdma.limit, "rdma.max")):
            for device, handles, objects in _rdma_entries(_read(os.path.join(d, name)) or ""):
                entries.add(device=device, hca_handles=handles, hca_objects=objects)
        m.hugetlb.extend(_hugetlb_v2(d))
        return m

    def oom_kills(self) -> int | None:
        """The kernel's OOM-kill count for this cgroup (``memory.events``)."""
        counters = self._memory_events.read()
        return None if counters is None else counters.get("oom_kill")

    async def watch_oom(self, on_oom: Callable[[], None]) -> None:
        await watch_oom_v2(self.dir, on_oom)


def _fill_psi(psi: v2pb.PSIStats, path: str) -> None:
    """A ``*.pressure`` file (``some|full avg10=F avg60=F avg300=F total=N`` lines)
    into ``psi``. As in the library (cgroups v3.0.3+, containerd 1.7): left out
    when the file is missing or unreadable (PSI off: EOPNOTSUPP) or any value
    does not parse; present, maybe empty, otherwise."""
    try:
        text = _read(path)
    except OSError:
        return
    if text is None:
        return
    parsed: dict[str, dict[str, float | int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] not in ("some", "full"):
            continue
        values: dict[str, float | int] = {}
        for pair in parts[1:]:
            key, sep, text_value = pair.partition("=")
            if not sep:
                return
            try:
                if key == "total":
                    values[key] = _parse_uint(text_value)
                elif key in ("avg10", "avg60", "avg300"):
                    values[key] = float(text_value)
            except ValueError:
                return
        parsed[parts[0]] = values
    psi.SetInParent()
    for kind, values in parsed.items():
        data = getattr(psi, kind)
        data.SetInParent()
        for key, number in values.items():
            setattr(data, key, number)


def _io_entries(text: str) -> list[v2pb.IOEntry]:
    """io.stat: ``MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N`` per device."""
    from shimv2.api.containerd.cgroups.v2 import metrics_pb2 as pb

    out = []
    for line in text.split("\n"):
        parts = line.split(" ")
        majmin = parts[0].split(":")
        if len(parts) < 2 or len(majmin) != 2:
            continue
        try:
            entry = pb.IOEntry(major=int(majmin[0]), minor=int(majmin[1]))
        except ValueError:
            break  # the library stops at an unparsable device
        for kv in parts[1:]:
            key, _, value = kv.partition("=")
            if key in _IO_KEYS:
                try:
                    setattr(entry, key, _parse_uint(value))
                except ValueError:
                    continue
        out.append(entry)
    return out


def _hugetlb_v2(d: str) -> list[v2pb.HugeTlbStat]:
    """hugetlb.<size>.current / .max (``max`` = maximum uint64), one entry per size."""
    from shimv2.api.containerd.cgroups.v2 import metrics_pb2 as pb

    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    by_size: dict[str, v2pb.HugeTlbStat] = {}
    for name in names:
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "hugetlb" or parts[2] not in ("current", "max"):
            continue
        text = _read(os.path.join(d, name))
        if text is None:
            continue
        try:
            value = _MAX_UINT64 if text.strip() == "max" else _parse_uint(text)
        except ValueError:
            continue
        stat = by_size.setdefault(parts[1], pb.HugeTlbStat(pagesize=parts[1]))
        setattr(stat, parts[2], value)
    return [by_size[size] for size in sorted(by_size)]


async def watch_oom_v2(cgroup_dir: str, on_oom: Callable[[], None]) -> None:
    """Call ``on_oom()`` whenever ``oom_kill`` of ``memory.events`` grows.

    Returns when ``memory.events`` is gone (cgroup removed) or ``cgroup.events``
    says ``populated 0`` (nothing left to kill). The state is also checked
    once right after the watches are set, so a kill that happened before is
    reported and an already empty cgroup is not watched.
    """
    import trio

    events_path = os.path.join(cgroup_dir, "memory.events")
    try:
        fd = _inotify_fd((events_path, os.path.join(cgroup_dir, "cgroup.events")))
    except OSError as e:
        if e.errno in _GONE_ERRNOS:
            return
        raise
    last = 0
    try:
        while True:
            events = _kv_file(events_path)
            if events is None:
                return
            oom_kill = events.get("oom_kill", 0)
            if oom_kill > last:
                last = oom_kill
                on_oom()
            populated = _kv_file(os.path.join(cgroup_dir, "cgroup.events"))
            if not populated or populated.get("populated", 0) == 0:
                return
            while True:
                await trio.lowlevel.wait_readable(fd)
                if _drain(fd):
                    break
    finally:
        os.close(fd)
