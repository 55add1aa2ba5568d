"""cgroup v1: a container's cgroup spread over one hierarchy per controller.

What belongs here: :class:`CgroupV1` (stats as ``io.containerd.cgroups.v1.Metrics``,
the OOM-kill count from ``memory.oom_control``), the readers of files only v1
has (cpuacct, blkio with /proc/partitions, hugetlb usage), and its OOM watch:
an eventfd registered through ``cgroup.event_control``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .files import (
    _GONE_ERRNOS,
    DEFAULT_ROOT,
    CgroupGone,
    _kv_file,
    _KvReader,
    _parse_uint,
    _rdma_entries,
    _read,
    _uint_file,
    _write,
)
from .paths import CgroupPaths

if TYPE_CHECKING:
    from shimv2.api.containerd.cgroups.v1 import metrics_pb2 as v1pb

log = logging.getLogger(__name__)

# The bare type URLs containerd and CRI expect in StatsResponse.stats (task-api.md §3.14).
V1_TYPE_URL = "io.containerd.cgroups.v1.Metrics"

# containerd's cgroups library hard-codes USER_HZ (ticks.go) for cpuacct.stat.
_CLOCK_TICKS = 100

# (MemoryStat field, memory.stat key); total_<field> comes from total_<key>.
_V1_MEMORY_KEYS = (
    ("cache", "cache"),
    ("rss", "rss"),
    ("rss_huge", "rss_huge"),
    ("mapped_file", "mapped_file"),
    ("dirty", "dirty"),
    ("writeback", "writeback"),
    ("pg_pg_in", "pgpgin"),
    ("pg_pg_out", "pgpgout"),
    ("pg_fault", "pgfault"),
    ("pg_maj_fault", "pgmajfault"),
    ("inactive_anon", "inactive_anon"),
    ("active_anon", "active_anon"),
    ("inactive_file", "inactive_file"),
    ("active_file", "active_file"),
    ("unevictable", "unevictable"),
)
# (MemoryStat entry, file infix) for memory[.<infix>].<name>.
_V1_MEMORY_ENTRIES = (
    ("usage", ""),
    ("swap", "memsw."),
    ("kernel", "kmem."),
    ("kernel_tcp", "kmem.tcp."),
)
_V1_MEMORY_ENTRY_FILES = (
    ("usage", "usage_in_bytes"),
    ("max", "max_usage_in_bytes"),
    ("failcnt", "failcnt"),
    ("limit", "limit_in_bytes"),
)
# The CFQ tables, in the order the library reads them: (BlkIOStat field, blkio.<file>).
_BLKIO_RECURSIVE = (
    ("sectors_recursive", "sectors_recursive"),
    ("io_service_bytes_recursive", "io_service_bytes_recursive"),
    ("io_serviced_recursive", "io_serviced_recursive"),
    ("io_queued_recursive", "io_queued_recursive"),
    ("io_service_time_recursive", "io_service_time_recursive"),
    ("io_wait_time_recursive", "io_wait_time_recursive"),
    ("io_merged_recursive", "io_merged_recursive"),
    ("io_time_recursive", "time_recursive"),
)
# Without CFQ (blk-mq, BFQ) the library falls back to the throttle counters.
_BLKIO_THROTTLE = (
    ("io_serviced_recursive", "throttle.io_serviced"),
    ("io_service_bytes_recursive", "throttle.io_service_bytes"),
)
_BLKIO_SPLIT = re.compile(r"[ :]+")


class CgroupV1:
    """A container's cgroup in the v1 hierarchies under ``root``."""

    version = 1
    type_url = V1_TYPE_URL

    def __init__(
        self, paths: Mapping[str, str], root: str = DEFAULT_ROOT, proc_root: str = "/proc"
    ) -> None:
        self.paths = CgroupPaths(dict(paths))
        self.root = root
        self.proc_root = proc_root
        memory = self.dir("memory")
        self._oom_control = (
            _KvReader(os.path.join(memory, "memory.oom_control")) if memory else None
        )

    def close(self) -> None:
        """The container is gone: release the kept file descriptors."""
        if self._oom_control is not None:
            self._oom_control.close()

    def __repr__(self) -> str:
        return f"CgroupV1({dict(self.paths.controllers)!r}, root={self.root!r})"

    def dir(self, controller: str) -> str | None:
        """``<root>/<controller>/<path>``, or None if the process has no such controller."""
        path = self.paths.get(controller)
        if path is None:
            return None
        return os.path.join(self.root, controller, path.lstrip("/"))

    def _active(self, controller: str) -> str | None:
        d = self.dir(controller)
        return d if d is not None and os.path.isdir(d) else None

    def exists(self) -> bool:
        """Any of its directories is still there (containerd: "no active subsystems")."""
        return any(self._active(name.removeprefix("name=")) for name in self.paths.controllers)

    def stats(self) -> v1pb.Metrics:
        """``io.containerd.cgroups.v1.Metrics``; raises CgroupGone if no directory is left.

        Like the library, ``cpu`` (with ``usage`` and ``throttling``) is always
        present; every other part only when its controller directory exists.
        Missing files leave their fields at zero or their part out.
        """
        from shimv2.api.containerd.cgroups.v1 import metrics_pb2 as pb

        if not self.exists():
            raise CgroupGone(f"cgroup does not exist: {self!r}")
        m = pb.Metrics()
        m.cpu.usage.SetInParent()
        m.cpu.throttling.SetInParent()
        for controller, fill in (
            ("pids", self._pids),
            ("cpu", self._cpu),
            ("cpuacct", self._cpuacct),
            ("memory", self._memory),
            ("blkio", self._blkio),
            ("hugetlb", self._hugetlb),
            ("rdma", self._rdma),
        ):
            d = self._active(controller)
            if d is not None:
                fill(d, m)
        return m

    def oom_kills(self) -> int | None:
        """The kernel's OOM-kill count for this cgroup (``memory.oom_control``)."""
        counters = self._oom_control.read() if self._oom_control is not None else None
        return None if counters is None else counters.get("oom_kill")

    async def watch_oom(self, on_oom: Callable[[], None]) -> None:
        """:func:`watch_oom_v1` on the memory cgroup; returns at once without one."""
        d = self.dir("memory")
        if d is None:
            log.warning("no memory cgroup to watch for OOM: %r", self)
            return
        await watch_oom_v1(d, on_oom)

    @staticmethod
    def _pids(d: str, m: v1pb.Metrics) -> None:
        current = _uint_file(os.path.join(d, "pids.current"))
        max_text = _read(os.path.join(d, "pids.max"))
        if current is None or max_text is None:
            return
        limit = 0  # v1 reports an unlimited pids.max ("max") as 0
        if max_text.strip() != "max":
            try:
                limit = _parse_uint(max_text)
            except ValueError:
                return
        m.pids.current = current
        m.pids.limit = limit

    @staticmethod
    def _cpu(d: str, m: v1pb.Metrics) -> None:
        stat = _kv_file(os.path.join(d, "cpu.stat")) or {}
        m.cpu.throttling.periods = stat.get("nr_periods", 0)
        m.cpu.throttling.throttled_periods = stat.get("nr_throttled", 0)
        m.cpu.throttling.throttled_time = stat.get("throttled_time", 0)

    @staticmethod
    def _cpuacct(d: str, m: v1pb.Metrics) -> None:
        # All or nothing, as in the library.
        stat = _kv_file(os.path.join(d, "cpuacct.stat"))
        total = _uint_file(os.path.join(d, "cpuacct.usage"))
        percpu_text = _read(os.path.join(d, "cpuacct.usage_percpu"))
        if stat is None or total is None or percpu_text is None:
            return
        if "user" not in stat or "system" not in stat:
            return
        try:
            percpu = [_parse_uint(v) for v in percpu_text.split()]
        except ValueError:
            return
        usage = m.cpu.usage
        usage.total = total
        # cpuacct.stat counts USER_HZ ticks; the message wants nanoseconds.
        usage.user = stat["user"] * 1_000_000_000 // _CLOCK_TICKS
        usage.kernel = stat["system"] * 1_000_000_000 // _CLOCK_TICKS
        usage.per_cpu.extend(percpu)

    @staticmethod
    def _memory(d: str, m: v1pb.Metrics) -> None:
        raw = _kv_file(os.path.join(d, "memory.stat"))
        if raw is None:
            return
        ms = m.memory
        for field, key in _V1_MEMORY_KEYS:
            setattr(ms, field, raw.get(key, 0))
            setattr(ms, "total_" + field, raw.get("total_" + key, 0))
        ms.hierarchical_memory_limit = raw.get("hierarchical_memory_limit", 0)
        ms.hierarchical_swap_limit = raw.get("hierarchical_memsw_limit", 0)
        # The library always sets all four entries. It stops at the first
        # missing file (losing kmem when swap accounting is off); we skip it.
        for entry_name, infix in _V1_MEMORY_ENTRIES:
            entry = getattr(ms, entry_name)
            entry.SetInParent()
            for field, name in _V1_MEMORY_ENTRY_FILES:
                value = _uint_file(os.path.join(d, f"memory.{infix}{name}"))
                if value is not None:
                    setattr(entry, field, value)
        oom = _kv_file(os.path.join(d, "memory.oom_control"))
        if oom is not None:
            m.memory_oom_control.SetInParent()
            m.memory_oom_control.oom_kill_disable = oom.get("oom_kill_disable", 0)
            m.memory_oom_control.under_oom = oom.get("under_oom", 0)
            m.memory_oom_control.oom_kill = oom.get("oom_kill", 0)

    def _blkio(self, d: str, m: v1pb.Metrics) -> None:
        m.blkio.SetInParent()  # present even when empty, as in the library
        devices = _partitions(os.path.join(self.proc_root, "partitions"))
        if devices is None:
            return
        if os.path.lexists(os.path.join(d, "blkio.io_serviced_recursive")):
            count = 0
            for field, name in _BLKIO_RECURSIVE:
                entries = _blkio_entries(os.path.join(d, "blkio." + name), devices)
                if entries is None:
                    return
                getattr(m.blkio, field).extend(entries)
                count += len(entries)
            if count:
                return
        for field, name in _BLKIO_THROTTLE:
            entries = _blkio_entries(os.path.join(d, "blkio." + name), devices)
            if entries is None:
                return
            getattr(m.blkio, field).extend(entries)

    @staticmethod
    def _hugetlb(d: str, m: v1pb.Metrics) -> None:
        from shimv2.api.containerd.cgroups.v1 import metrics_pb2 as pb

        try:
            names = os.listdir(d)
        except OSError:
            return
        # Page sizes as the kernel names the files ("2MB", "1GB"): the same
        # strings the library derives from /sys/kernel/mm/hugepages.
        sizes = sorted(
            parts[1]
            for parts in (n.split(".") for n in names)
            if len(parts) == 3 and parts[0] == "hugetlb" and parts[2] == "usage_in_bytes"
        )
        for size in sizes:
            usage = _uint_file(os.path.join(d, f"hugetlb.{size}.usage_in_bytes"))
            max_usage = _uint_file(os.path.join(d, f"hugetlb.{size}.max_usage_in_bytes"))
            failcnt = _uint_file(os.path.join(d, f"hugetlb.{size}.failcnt"))
            if usage is None or max_usage is None or failcnt is None:
                continue
            m.hugetlb.append(
                pb.HugetlbStat(usage=usage, max=max_usage, failcnt=failcnt, pagesize=size)
            )

    @staticmethod
    def _rdma(d: str, m: v1pb.Metrics) -> None:
        current = _read(os.path.join(d, "rdma.current"))
        limit = _read(os.path.join(d, "rdma.max"))
        if current is None or limit is None:
            return
        if len(current.split("\n")) != len(limit.split("\n")):
            return  # the library gives up on mismatched files
        m.rdma.SetInParent()
        for entries, text in ((m.rdma.current, current), (m.rdma.limit, limit)):
            for device, handles, objects in _rdma_entries(text):
                entries.add(device=device, hca_handles=handles, hca_objects=objects)


def _partitions(path: str) -> dict[tuple[int, int], str] | None:
    """(major, minor) -> /dev/<name> from /proc/partitions (two header lines)."""
    text = _read(path)
    if text is None:
        return None
    devices: dict[tuple[int, int], str] = {}
    for line in text.splitlines()[2:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        try:
            key = (int(fields[0]), int(fields[1]))
        except ValueError:
            continue
        devices.setdefault(key, "/dev/" + fields[3])
    return devices


def _blkio_entries(
    path: str, devices: Mapping[tuple[int, int], str]
) -> list[v1pb.BlkIOEntry] | None:
    """Lines ``MAJ:MIN [Op] value``; the trailing ``Total N`` line is skipped."""
    from shimv2.api.containerd.cgroups.v1 import metrics_pb2 as pb

    text = _read(path)
    if text is None:
        return None
    out = []
    for line in text.splitlines():
        fields = [f for f in _BLKIO_SPLIT.split(line) if f]
        if len(fields) not in (3, 4):
            continue
        try:
            major, minor, value = int(fields[0]), int(fields[1]), _parse_uint(fields[-1])
        except ValueError:
            continue
        out.append(
            pb.BlkIOEntry(
                op=fields[2] if len(fields) == 4 else "",
                device=devices.get((major, minor), ""),
                major=major,
                minor=minor,
                value=value,
            )
        )
    return out


async def watch_oom_v1(memory_cgroup_dir: str, on_oom: Callable[[], None]) -> None:
    """Call ``on_oom()`` for each OOM of a v1 memory cgroup; return once it is removed.

    The kernel signals the eventfd registered through ``cgroup.event_control``
    on every OOM and once more when the cgroup is removed. Returns at once if
    the cgroup is already gone. Runs until cancelled otherwise.
    """
    import trio

    # Non-blocking although trio says "readable": a wakeup must never block the loop.
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        try:
            ofd = os.open(
                os.path.join(memory_cgroup_dir, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC
            )
            try:
                # containerd writes "%d %d %s" with an empty argument.
                _write(os.path.join(memory_cgroup_dir, "cgroup.event_control"), f"{efd} {ofd} ")
            finally:
                os.close(ofd)  # the kernel holds its own reference now
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                return
            raise
        while True:
            await trio.lowlevel.wait_readable(efd)
            try:
                os.read(efd, 8)
            except BlockingIOError:
                continue
            if not os.path.isdir(memory_cgroup_dir):
                return  # the removal notification, not an OOM
            on_oom()
    finally:
        os.close(efd)
