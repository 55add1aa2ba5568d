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

import contextlib
import errno
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from shimv2.api.containerd.cgroups.v1 import metrics_pb2 as v1pb
    from shimv2.api.containerd.cgroups.v2 import metrics_pb2 as v2pb

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/fs/cgroup"
# The bare type URLs containerd and CRI expect in StatsResponse.stats (task-api.md §3.14).
V1_TYPE_URL = "io.containerd.cgroups.v1.Metrics"
V2_TYPE_URL = "io.containerd.cgroups.v2.Metrics"

_MAX_UINT64 = (1 << 64) - 1
_MAX_UINT32 = (1 << 32) - 1
# containerd's cgroups library hard-codes USER_HZ (ticks.go) for cpuacct.stat.
_CLOCK_TICKS = 100
# Files of a cgroup that is gone: ENOENT on open, ENODEV while it is being removed.
_GONE_ERRNOS = (errno.ENOENT, errno.ENODEV)


class CgroupError(Exception):
    pass


class CgroupGone(CgroupError):
    """The cgroup's directory no longer exists."""


# --------------------------------------------------------------------------- files


def _read(path: str) -> str | None:
    """The file's text, or None when it (or its cgroup) does not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        if e.errno in _GONE_ERRNOS:
            return None
        raise


def _write(path: str, data: str) -> None:
    # O_WRONLY without O_CREAT/O_TRUNC: never create a file where a cgroup knob is missing.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _parse_uint(text: str) -> int:
    """Go cgroups' parseUint: decimal uint64, negative numbers (e.g. ``-1``) read as 0."""
    value = int(text.strip(), 10)
    if value > _MAX_UINT64:
        raise ValueError(f"{text!r} out of range")
    return max(value, 0)


def _uint_file(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return _parse_uint(text)
    except ValueError:
        return None


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


def _kv(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, ...); malformed lines are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = _parse_uint(parts[1])
            except ValueError:
                continue
    return out


def _kv_file(path: str) -> dict[str, int] | None:
    text = _read(path)
    return None if text is None else _kv(text)


class _KvReader:
    """A ``key value`` file read at every exit (``memory.oom_control``,
    ``memory.events``): opened once, then re-read with pread(2). An open, read and
    close of a cgroup file cost 0.1-0.3 ms on a busy daemon's exit path (kernfs
    path walk and seq_file set-up), a pread ~1 us."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._closed = False

    def read(self) -> dict[str, int] | None:
        if self._fd < 0:
            if self._closed:
                return _kv_file(self.path)  # released: read it without keeping an fd
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno in _GONE_ERRNOS:
                    return None
                raise
        try:
            data = os.pread(self._fd, 4096, 0)
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                return None
            raise
        return _kv(data.decode("utf-8", errors="replace"))

    def close(self) -> None:
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --------------------------------------------------------------------------- /proc


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


# --------------------------------------------------------------------------- v1

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


def _rdma_entries(text: str) -> list[tuple[str, int, int]]:
    """``<device> hca_handle=N hca_object=N`` lines as (device, handles, objects).

    ``max`` is the maximum uint32; an unparsable value stays 0.
    """
    out = []
    for line in text.split("\n"):
        parts = line.split()
        if len(parts) != 3:
            continue
        values = {"hca_handle": 0, "hca_object": 0}
        for kv in parts[1:]:
            key, _, value = kv.partition("=")
            if key not in values:
                continue
            if value == "max":
                values[key] = _MAX_UINT32
                continue
            with contextlib.suppress(ValueError):
                number = _parse_uint(value)
                if number <= _MAX_UINT32:
                    values[key] = number
        out.append((parts[0], values["hca_handle"], values["hca_object"]))
    return out


# --------------------------------------------------------------------------- v2

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


# --------------------------------------------------------------------------- OOM


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


_IN_MODIFY = 0x00000002


def _inotify_fd(paths: tuple[str, ...]) -> int:
    """An inotify fd (non-blocking, close-on-exec) watching ``paths`` for IN_MODIFY."""
    import ctypes

    from shimv2.libc import libc

    libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)  # IN_NONBLOCK | IN_CLOEXEC
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    for path in paths:
        if libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", path)
    return int(fd)


def _drain(fd: int) -> bool:
    """Read all queued inotify events; True if there was any."""
    got = False
    while True:
        try:
            if not os.read(fd, 4096):
                return got
        except BlockingIOError:
            return got
        got = True


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


# --------------------------------------------------------------------------- placement


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
