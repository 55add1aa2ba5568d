"""shimv2.cgroups: /proc/<pid>/cgroup, stats in both Metrics layouts, OOM watchers, shim placement.

Fake trees in tmp_path use the file formats of a real kernel (copied from the
v1 hierarchies of the test machine, and the cgroup2 documentation for v2).
The tests marked "real" create their own cgroups under /sys/fs/cgroup (root;
v1 hierarchies or the unified v2 one, each skipped on the other kind of
host) and remove them again.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from shimv2 import cgroups
from shimv2.api.containerd.cgroups.v1 import metrics_pb2 as v1pb
from shimv2.api.containerd.cgroups.v2 import metrics_pb2 as v2pb
from shimv2.cgroups import (
    CgroupError,
    CgroupGone,
    CgroupPaths,
    CgroupV1,
    CgroupV2,
    cgroup_paths,
    detect,
    move_to_cgroup,
    watch_oom_v1,
    watch_oom_v2,
)
from shimv2.cgroups.files import _KvReader

MAX64 = (1 << 64) - 1
MAX32 = (1 << 32) - 1
PAGE_COUNTER_MAX = 9223372036854771712  # "unlimited" in v1 memory files (x86_64, 4 KiB pages)


def write_tree(base: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


async def settle() -> None:
    """Let every task run until all wait, with a short I/O poll in between."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.02)


# --------------------------------------------------------------------------- /proc/<pid>/cgroup

HYBRID = """\
12:rdma:/
11:net_cls,net_prio:/
10:hugetlb:/ctr/abc
9:name=systemd:/system.slice/containerd.service
8:pids:/ctr/abc
7:blkio:/ctr/abc
6:freezer:/ctr/abc
5:devices:/ctr/abc
4:memory:/ctr/abc
3:cpuset:/ctr/abc
2:cpu,cpuacct:/ctr/abc
0::/system.slice/containerd.service
"""


def fake_proc(tmp_path: Path, pid: int, cgroup: str, mountinfo: str = "") -> Path:
    proc = tmp_path / "proc"
    write_tree(proc, {f"{pid}/cgroup": cgroup, "self/mountinfo": mountinfo})
    return proc


def test_cgroup_paths_hybrid(tmp_path: Path) -> None:
    paths = cgroup_paths(42, str(fake_proc(tmp_path, 42, HYBRID)))
    assert paths.unified == "/system.slice/containerd.service"
    assert paths.controllers["cpu"] == paths.controllers["cpuacct"] == "/ctr/abc"
    assert paths.controllers["net_cls"] == paths.controllers["net_prio"] == "/"
    assert paths.controllers["name=systemd"] == "/system.slice/containerd.service"
    assert paths.get("systemd") == "/system.slice/containerd.service"
    assert paths.get("memory") == "/ctr/abc"
    assert paths.get("misc") is None
    assert len(paths.controllers) == 13


def test_cgroup_paths_unified_only(tmp_path: Path) -> None:
    # A colon inside the path belongs to the path.
    proc = fake_proc(tmp_path, 7, "0::/kubepods/burstable/pod1:2/ctr\n")
    assert cgroup_paths(7, str(proc)) == CgroupPaths({}, "/kubepods/burstable/pod1:2/ctr")


def test_cgroup_paths_v1_only_and_this_machines_layout(tmp_path: Path) -> None:
    # Separate cpu and cpuacct hierarchies, no 0:: line (pure legacy).
    text = "9:name=systemd:/\n4:memory:/a/b\n2:cpuacct:/\n1:cpu:/\n"
    paths = cgroup_paths(1, str(fake_proc(tmp_path, 1, text)))
    assert paths.unified is None
    assert paths.controllers == {"name=systemd": "/", "memory": "/a/b", "cpuacct": "/", "cpu": "/"}


def test_cgroup_paths_errors(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 5, "4:memory\n")
    with pytest.raises(CgroupError, match="invalid cgroup entry"):
        cgroup_paths(5, str(proc))
    with pytest.raises(FileNotFoundError):
        cgroup_paths(6, str(proc))


def test_cgroup_paths_of_a_real_process() -> None:
    paths = cgroup_paths(os.getpid())
    assert paths.controllers or paths.unified is not None
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        assert len(f.read().splitlines()) >= 1


# --------------------------------------------------------------------------- detect


def mountinfo_for(root: Path, unified: bool, v1: Iterable[str] = ()) -> str:
    lines = []
    if unified:
        lines.append(f"30 23 0:26 / {root} rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate")
    else:
        lines.append(f"31 23 0:28 / {root} rw shared:9 - tmpfs tmpfs rw,mode=755")
        for i, name in enumerate(v1):
            lines.append(f"{40 + i} 31 0:{40 + i} / {root}/{name} rw - cgroup cgroup rw,{name}")
        lines.append(f"60 31 0:60 / {root}/unified rw - cgroup2 cgroup2 rw")
    return "\n".join(["22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw", *lines]) + "\n"


def test_detect_unified(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = fake_proc(tmp_path, 3, "0::/ctr/abc\n", mountinfo_for(root, unified=True))
    cg = detect(3, str(root), str(proc))
    assert isinstance(cg, CgroupV2)
    assert cg.dir == str(root / "ctr/abc")


def test_detect_hybrid_is_v1(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    mi = mountinfo_for(root, unified=False, v1=["memory", "cpu,cpuacct"])
    proc = fake_proc(tmp_path, 3, HYBRID, mi)
    cg = detect(3, str(root), str(proc))
    assert isinstance(cg, CgroupV1)
    assert cg.dir("memory") == str(root / "memory/ctr/abc")
    assert cg.dir("systemd") == str(root / "systemd/system.slice/containerd.service")


def test_detect_errors_and_explicit_mountinfo(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = fake_proc(tmp_path, 3, "4:memory:/x\n", mountinfo_for(root, unified=True))
    with pytest.raises(CgroupError, match="0::"):
        detect(3, str(root), str(proc))
    other = tmp_path / "mountinfo"
    other.write_text(mountinfo_for(root, unified=False, v1=["memory"]))
    assert isinstance(detect(3, str(root), str(proc), mountinfo=str(other)), CgroupV1)
    proc2 = fake_proc(tmp_path / "2", 3, "0::/x\n", mountinfo_for(root, unified=False))
    with pytest.raises(CgroupError, match="v1"):
        detect(3, str(root), str(proc2))


def test_mountinfo_escapes_and_shadowing(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs rw\n"
        "32 31 0:29 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
        "33 23 0:30 / /srv/my\\040cg rw master:1 - cgroup2 cgroup2 rw\n"
    )
    assert cgroups.is_unified("/sys/fs/cgroup/", str(mi))
    assert cgroups.is_unified("/srv/my cg", str(mi))
    assert not cgroups.is_unified("/srv", str(mi))


def test_detect_on_this_machine() -> None:
    cg = detect(os.getpid())
    assert isinstance(cg, CgroupV2 if cgroups.is_unified() else CgroupV1)


# --------------------------------------------------------------------------- v1 stats

V1_MEMORY_STAT = """\
cache 8962048
rss 1699840
rss_huge 2097152
shmem 4096
mapped_file 32768
dirty 45056
writeback 8192
workingset_refault_anon 0
workingset_refault_file 2253
swap 0
swapcached 0
pgpgin 21138
pgpgout 18530
pgfault 44299
pgmajfault 36
inactive_anon 1519616
active_anon 12288
inactive_file 1171456
active_file 7790592
unevictable 16384
hierarchical_memory_limit 16777216
hierarchical_memsw_limit 33554432
total_cache 18962048
total_rss 11699840
total_rss_huge 12097152
total_shmem 10004096
total_mapped_file 10032768
total_dirty 10045056
total_writeback 10008192
total_workingset_refault_anon 0
total_workingset_refault_file 2253
total_swap 0
total_swapcached 0
total_pgpgin 121138
total_pgpgout 118530
total_pgfault 144299
total_pgmajfault 136
total_inactive_anon 11519616
total_active_anon 10012288
total_inactive_file 11171456
total_active_file 17790592
total_unevictable 10016384
"""

PARTITIONS = """\
major minor  #blocks  name

   8        0  268435456 sda
   8        1  268434432 sda1
 254        0  268435456 vda
"""

# Formats read on the test machine (blk-mq, no CFQ: only the throttle tables count).
THROTTLE_BYTES = """\
254:0 Read 36864
254:0 Write 32768
254:0 Sync 102400
254:0 Async 0
254:0 Discard 32768
254:0 Total 102400
253:7 Read 4096
253:7 Write 0
253:7 Sync 4096
253:7 Async 0
253:7 Discard 0
253:7 Total 4096
Total 106496
"""
THROTTLE_IOS = """\
254:0 Read 9
254:0 Write 8
254:0 Sync 19
254:0 Async 0
254:0 Discard 2
254:0 Total 19
Total 19
"""


def v1_tree(root: Path, proc: Path, cg: str = "ctr/abc") -> None:
    """A container cgroup in every v1 hierarchy; cpu and cpuacct co-mounted (Debian default)."""
    write_tree(proc, {"partitions": PARTITIONS})
    files = {
        "pids/cgroup.procs": "",
        f"pids/{cg}/pids.current": "3\n",
        f"pids/{cg}/pids.max": "max\n",
        f"pids/{cg}/pids.events": "max 0\n",
        f"cpu,cpuacct/{cg}/cpu.stat": (
            "nr_periods 120\nnr_throttled 7\nthrottled_time 3500000\nnr_bursts 0\nburst_time 0\n"
        ),
        f"cpu,cpuacct/{cg}/cpuacct.stat": "user 78501\nsystem 17239\n",
        f"cpu,cpuacct/{cg}/cpuacct.usage": "957411656626\n",
        f"cpu,cpuacct/{cg}/cpuacct.usage_percpu": "467268728748 490142927878 \n",
        f"cpu,cpuacct/{cg}/cpuacct.usage_all": "cpu user system\n0 1 2\n1 3 4\n",
        f"memory/{cg}/memory.stat": V1_MEMORY_STAT,
        f"memory/{cg}/memory.oom_control": "oom_kill_disable 0\nunder_oom 1\noom_kill 2\n",
        f"memory/{cg}/memory.limit_in_bytes": "16777216\n",
        f"memory/{cg}/memory.usage_in_bytes": "12513280\n",
        f"memory/{cg}/memory.max_usage_in_bytes": "13651968\n",
        f"memory/{cg}/memory.failcnt": "3\n",
        f"memory/{cg}/memory.memsw.limit_in_bytes": "33554432\n",
        f"memory/{cg}/memory.memsw.usage_in_bytes": "12517376\n",
        f"memory/{cg}/memory.memsw.max_usage_in_bytes": "13656064\n",
        f"memory/{cg}/memory.memsw.failcnt": "1\n",
        f"memory/{cg}/memory.kmem.limit_in_bytes": f"{PAGE_COUNTER_MAX}\n",
        f"memory/{cg}/memory.kmem.usage_in_bytes": "1847296\n",
        f"memory/{cg}/memory.kmem.max_usage_in_bytes": "2064384\n",
        f"memory/{cg}/memory.kmem.failcnt": "0\n",
        # Go's parseUint reads negative numbers as 0.
        f"memory/{cg}/memory.kmem.tcp.limit_in_bytes": "-1\n",
        f"memory/{cg}/memory.kmem.tcp.usage_in_bytes": "4096\n",
        f"memory/{cg}/memory.kmem.tcp.max_usage_in_bytes": "8192\n",
        f"memory/{cg}/memory.kmem.tcp.failcnt": "5\n",
        f"blkio/{cg}/blkio.throttle.io_service_bytes": THROTTLE_BYTES,
        f"blkio/{cg}/blkio.throttle.io_serviced": THROTTLE_IOS,
        f"blkio/{cg}/blkio.throttle.io_service_bytes_recursive": "Total 0\n",
        f"blkio/{cg}/blkio.bfq.io_service_bytes_recursive": "Total 0\n",
        f"hugetlb/{cg}/hugetlb.2MB.usage_in_bytes": "4194304\n",
        f"hugetlb/{cg}/hugetlb.2MB.max_usage_in_bytes": "6291456\n",
        f"hugetlb/{cg}/hugetlb.2MB.failcnt": "1\n",
        f"hugetlb/{cg}/hugetlb.2MB.limit_in_bytes": f"{PAGE_COUNTER_MAX}\n",
        f"hugetlb/{cg}/hugetlb.2MB.rsvd.usage_in_bytes": "999\n",
        f"hugetlb/{cg}/hugetlb.1GB.usage_in_bytes": "0\n",
        f"hugetlb/{cg}/hugetlb.1GB.max_usage_in_bytes": "0\n",
        f"hugetlb/{cg}/hugetlb.1GB.failcnt": "0\n",
        f"rdma/{cg}/rdma.current": (
            "mlx4_0 hca_handle=2 hca_object=2000\nocrdma1 hca_handle=3 hca_object=7\n"
        ),
        f"rdma/{cg}/rdma.max": (
            "mlx4_0 hca_handle=max hca_object=max\nocrdma1 hca_handle=10 hca_object=100\n"
        ),
        f"freezer/{cg}/freezer.state": "THAWED\n",
    }
    write_tree(root, files)
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")


V1_PATHS = {
    name: "/ctr/abc"
    for name in ("pids", "cpu", "cpuacct", "memory", "blkio", "hugetlb", "rdma", "freezer")
}


def entry(op: str, device: str, major: int, minor: int, value: int) -> v1pb.BlkIOEntry:
    return v1pb.BlkIOEntry(op=op, device=device, major=major, minor=minor, value=value)


def expected_v1_memory() -> v1pb.MemoryStat:
    return v1pb.MemoryStat(
        cache=8962048,
        rss=1699840,
        rss_huge=2097152,
        mapped_file=32768,
        dirty=45056,
        writeback=8192,
        pg_pg_in=21138,
        pg_pg_out=18530,
        pg_fault=44299,
        pg_maj_fault=36,
        inactive_anon=1519616,
        active_anon=12288,
        inactive_file=1171456,
        active_file=7790592,
        unevictable=16384,
        hierarchical_memory_limit=16777216,
        hierarchical_swap_limit=33554432,
        total_cache=18962048,
        total_rss=11699840,
        total_rss_huge=12097152,
        total_mapped_file=10032768,
        total_dirty=10045056,
        total_writeback=10008192,
        total_pg_pg_in=121138,
        total_pg_pg_out=118530,
        total_pg_fault=144299,
        total_pg_maj_fault=136,
        total_inactive_anon=11519616,
        total_active_anon=10012288,
        total_inactive_file=11171456,
        total_active_file=17790592,
        total_unevictable=10016384,
        usage=v1pb.MemoryEntry(limit=16777216, usage=12513280, max=13651968, failcnt=3),
        swap=v1pb.MemoryEntry(limit=33554432, usage=12517376, max=13656064, failcnt=1),
        kernel=v1pb.MemoryEntry(limit=PAGE_COUNTER_MAX, usage=1847296, max=2064384, failcnt=0),
        kernel_tcp=v1pb.MemoryEntry(limit=0, usage=4096, max=8192, failcnt=5),
    )


def test_v1_stats_every_field(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    v1_tree(root, proc)
    m = CgroupV1(V1_PATHS, str(root), str(proc)).stats()
    expected = v1pb.Metrics(
        hugetlb=[
            v1pb.HugetlbStat(usage=0, max=0, failcnt=0, pagesize="1GB"),
            v1pb.HugetlbStat(usage=4194304, max=6291456, failcnt=1, pagesize="2MB"),
        ],
        pids=v1pb.PidsStat(current=3, limit=0),  # v1: "max" reads as 0
        cpu=v1pb.CPUStat(
            usage=v1pb.CPUUsage(
                total=957411656626,
                user=78501 * 10_000_000,  # ticks of 1/100 s in ns
                kernel=17239 * 10_000_000,
                per_cpu=[467268728748, 490142927878],
            ),
            throttling=v1pb.Throttle(periods=120, throttled_periods=7, throttled_time=3500000),
        ),
        memory=expected_v1_memory(),
        blkio=v1pb.BlkIOStat(
            io_serviced_recursive=[
                entry("Read", "/dev/vda", 254, 0, 9),
                entry("Write", "/dev/vda", 254, 0, 8),
                entry("Sync", "/dev/vda", 254, 0, 19),
                entry("Async", "/dev/vda", 254, 0, 0),
                entry("Discard", "/dev/vda", 254, 0, 2),
                entry("Total", "/dev/vda", 254, 0, 19),
            ],
            io_service_bytes_recursive=[
                entry("Read", "/dev/vda", 254, 0, 36864),
                entry("Write", "/dev/vda", 254, 0, 32768),
                entry("Sync", "/dev/vda", 254, 0, 102400),
                entry("Async", "/dev/vda", 254, 0, 0),
                entry("Discard", "/dev/vda", 254, 0, 32768),
                entry("Total", "/dev/vda", 254, 0, 102400),
                # not in /proc/partitions: no device name
                entry("Read", "", 253, 7, 4096),
                entry("Write", "", 253, 7, 0),
                entry("Sync", "", 253, 7, 4096),
                entry("Async", "", 253, 7, 0),
                entry("Discard", "", 253, 7, 0),
                entry("Total", "", 253, 7, 4096),
            ],
        ),
        rdma=v1pb.RdmaStat(
            current=[
                v1pb.RdmaEntry(device="mlx4_0", hca_handles=2, hca_objects=2000),
                v1pb.RdmaEntry(device="ocrdma1", hca_handles=3, hca_objects=7),
            ],
            limit=[
                v1pb.RdmaEntry(device="mlx4_0", hca_handles=MAX32, hca_objects=MAX32),
                v1pb.RdmaEntry(device="ocrdma1", hca_handles=10, hca_objects=100),
            ],
        ),
        memory_oom_control=v1pb.MemoryOomControl(oom_kill_disable=0, under_oom=1, oom_kill=2),
    )
    assert m == expected
    assert not m.network and not m.HasField("cgroup_stats")  # the library never fills them
    assert v1pb.Metrics.FromString(m.SerializeToString()) == expected
    assert CgroupV1.type_url == "io.containerd.cgroups.v1.Metrics"


CFQ = {
    "sectors_recursive": "8:0 2048\n8:16 16\n",
    "io_service_bytes_recursive": (
        "8:0 Read 1048576\n8:0 Write 4096\n8:0 Total 1052672\nTotal 1052672\n"
    ),
    "io_serviced_recursive": "8:0 Read 256\n8:0 Write 1\n8:0 Total 257\nTotal 257\n",
    "io_queued_recursive": "8:0 Read 0\n8:0 Write 0\n8:0 Total 0\nTotal 0\n",
    "io_service_time_recursive": "8:0 Read 90000\n8:0 Write 10\n8:0 Total 90010\nTotal 90010\n",
    "io_wait_time_recursive": "8:0 Read 500\n8:0 Write 2\n8:0 Total 502\nTotal 502\n",
    "io_merged_recursive": "8:0 Read 3\n8:0 Write 0\n8:0 Total 3\nTotal 3\n",
    "time_recursive": "8:0 77\n",
}


def test_v1_blkio_cfq_tables(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    v1_tree(root, proc)
    write_tree(root / "blkio/ctr/abc", {f"blkio.{k}": v for k, v in CFQ.items()})
    blkio = CgroupV1(V1_PATHS, str(root), str(proc)).stats().blkio
    assert list(blkio.sectors_recursive) == [
        entry("", "/dev/sda", 8, 0, 2048),
        entry("", "", 8, 16, 16),
    ]
    assert list(blkio.io_service_bytes_recursive) == [
        entry("Read", "/dev/sda", 8, 0, 1048576),
        entry("Write", "/dev/sda", 8, 0, 4096),
        entry("Total", "/dev/sda", 8, 0, 1052672),
    ]
    assert [e.value for e in blkio.io_serviced_recursive] == [256, 1, 257]
    assert [e.value for e in blkio.io_queued_recursive] == [0, 0, 0]
    assert [e.value for e in blkio.io_service_time_recursive] == [90000, 10, 90010]
    assert [e.value for e in blkio.io_wait_time_recursive] == [500, 2, 502]
    assert [e.value for e in blkio.io_merged_recursive] == [3, 0, 3]
    assert list(blkio.io_time_recursive) == [entry("", "/dev/sda", 8, 0, 77)]


def test_v1_blkio_empty_cfq_falls_back_to_throttle(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    v1_tree(root, proc)
    write_tree(root / "blkio/ctr/abc", {f"blkio.{k}": "Total 0\n" for k in CFQ})
    blkio = CgroupV1(V1_PATHS, str(root), str(proc)).stats().blkio
    assert [e.value for e in blkio.io_serviced_recursive] == [9, 8, 19, 0, 2, 19]
    assert len(blkio.io_service_bytes_recursive) == 12
    assert not blkio.sectors_recursive and not blkio.io_time_recursive


def test_v1_missing_controllers_are_omitted(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    v1_tree(root, proc, cg="other")  # every hierarchy mounted, the container only in memory
    write_tree(root / "memory/ctr/abc", {"memory.stat": V1_MEMORY_STAT})
    m = CgroupV1(V1_PATHS, str(root), str(proc)).stats()
    for name in ("pids", "blkio", "rdma", "memory_oom_control", "cgroup_stats"):
        assert not m.HasField(name), name
    assert not m.hugetlb
    # The library always creates cpu with empty usage and throttling.
    assert m.HasField("cpu") and m.cpu.HasField("usage") and m.cpu.HasField("throttling")
    assert m.cpu == v1pb.CPUStat(usage=v1pb.CPUUsage(), throttling=v1pb.Throttle())
    # memory.stat alone: its numbers, and the four entries present but zero.
    assert m.memory.total_rss == 11699840
    for name in ("usage", "swap", "kernel", "kernel_tcp"):
        assert m.memory.HasField(name) and getattr(m.memory, name) == v1pb.MemoryEntry()


def test_v1_missing_files_within_a_controller(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    v1_tree(root, proc)
    d = root / "cpu,cpuacct/ctr/abc"
    (d / "cpuacct.usage_percpu").unlink()  # cpuacct usage is all or nothing
    (root / "pids/ctr/abc/pids.max").unlink()  # pids needs both files
    for name in ("usage_in_bytes", "max_usage_in_bytes", "failcnt", "limit_in_bytes"):
        (root / f"memory/ctr/abc/memory.memsw.{name}").unlink()  # no swap accounting
    (root / "hugetlb/ctr/abc/hugetlb.2MB.failcnt").unlink()
    (root / "rdma/ctr/abc/rdma.max").write_text("mlx4_0 hca_handle=1 hca_object=1\n\n\n")
    m = CgroupV1(V1_PATHS, str(root), str(proc)).stats()
    assert m.cpu.usage == v1pb.CPUUsage()
    assert m.cpu.throttling.throttled_periods == 7
    assert not m.HasField("pids")
    assert m.memory.swap == v1pb.MemoryEntry()
    assert m.memory.kernel.usage == 1847296  # not lost with swap accounting off
    assert [h.pagesize for h in m.hugetlb] == ["1GB"]
    assert not m.HasField("rdma")  # line counts differ: the library gives up


def test_v1_pids_limit_and_unparsable_values(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    v1_tree(root, proc)
    (root / "pids/ctr/abc/pids.max").write_text("4096\n")
    (root / "memory/ctr/abc/memory.failcnt").write_text("garbage\n")
    (root / "memory/ctr/abc/memory.stat").write_text("cache 1\nrss\nbogus line here\nrss_huge x\n")
    m = CgroupV1(V1_PATHS, str(root), str(proc)).stats()
    assert m.pids == v1pb.PidsStat(current=3, limit=4096)
    assert m.memory.usage.failcnt == 0 and m.memory.usage.usage == 12513280
    assert m.memory.cache == 1 and m.memory.rss == 0 and m.memory.rss_huge == 0


def test_v1_no_proc_partitions_leaves_blkio_empty(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    v1_tree(root, proc)
    (proc / "partitions").unlink()
    m = CgroupV1(V1_PATHS, str(root), str(proc)).stats()
    assert m.HasField("blkio") and m.blkio == v1pb.BlkIOStat()


def test_v1_vanished_cgroup_raises_gone(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    v1_tree(root, proc)
    cg = CgroupV1(V1_PATHS, str(root), str(proc))
    assert cg.exists()
    for name in ("pids", "cpu,cpuacct", "memory", "blkio", "hugetlb", "rdma", "freezer"):
        for p in sorted((root / name / "ctr/abc").rglob("*"), reverse=True):
            p.unlink()
        (root / name / "ctr/abc").rmdir()
    assert not cg.exists()
    with pytest.raises(CgroupGone):
        cg.stats()
    with pytest.raises(CgroupGone):
        CgroupV1({"memory": "/nope"}, str(tmp_path / "no-such-root")).stats()


# --------------------------------------------------------------------------- v2 stats

V2_MEMORY_STAT = """\
anon 1000001
file 1000002
kernel_stack 1000003
slab 1000004
sock 1000005
shmem 1000006
file_mapped 1000007
file_dirty 1000008
file_writeback 1000009
anon_thp 1000010
inactive_anon 1000011
active_anon 1000012
inactive_file 1000013
active_file 1000014
unevictable 1000015
slab_reclaimable 1000016
slab_unreclaimable 1000017
pgfault 1000018
pgmajfault 1000019
workingset_refault 1000020
workingset_activate 1000021
workingset_nodereclaim 1000022
pgrefill 1000023
pgscan 1000024
pgsteal 1000025
pgactivate 1000026
pgdeactivate 1000027
pglazyfree 1000028
pglazyfreed 1000029
thp_fault_alloc 1000030
thp_collapse_alloc 1000031
kernel 2000000
pagetables 2000001
percpu 2000002
workingset_refault_anon 2000003
workingset_refault_file 2000004
zswap 0
"""
V2_MEMORY_KEYS = [line.split()[0] for line in V2_MEMORY_STAT.splitlines()][:31]

V2_FILES = {
    "cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n",
    "cgroup.events": "populated 1\nfrozen 0\n",
    "cpu.stat": (
        "usage_usec 4813941\nuser_usec 3563014\nsystem_usec 1250927\n"
        "nr_periods 11\nnr_throttled 2\nthrottled_usec 39512\nnr_bursts 0\nburst_usec 0\n"
    ),
    "memory.stat": V2_MEMORY_STAT,
    "memory.current": "23891968\n",
    "memory.max": "max\n",
    "memory.swap.current": "4096\n",
    "memory.swap.max": "536870912\n",
    "memory.peak": "31457280\n",
    "memory.swap.peak": "8192\n",
    "memory.events": "low 1\nhigh 2\nmax 3\noom 4\noom_kill 5\noom_group_kill 0\n",
    "cpu.pressure": (
        "some avg10=1.25 avg60=0.50 avg300=0.10 total=123456\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    ),
    "memory.pressure": (
        "some avg10=12.34 avg60=5.67 avg300=1.01 total=987654321\n"
        "full avg10=10.00 avg60=4.00 avg300=0.75 total=876543210\n"
    ),
    "io.pressure": (
        "some avg10=0.00 avg60=0.02 avg300=0.00 total=4242\n"
        "full avg10=0.00 avg60=0.01 avg300=0.00 total=4000\n"
    ),
    "pids.current": "7\n",
    "pids.max": "max\n",
    "io.stat": (
        "8:0 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n"
        "254:16 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=512 dios=1\n"
    ),
    "rdma.current": "mlx4_0 hca_handle=2 hca_object=2000\n",
    "rdma.max": "mlx4_0 hca_handle=max hca_object=10000\n",
    "hugetlb.2MB.current": "2097152\n",
    "hugetlb.2MB.max": "max\n",
    "hugetlb.2MB.rsvd.current": "0\n",
    "hugetlb.2MB.rsvd.max": "max\n",
    "hugetlb.2MB.events": "max 0\n",
    "hugetlb.1GB.current": "0\n",
    "hugetlb.1GB.max": "1073741824\n",
}


def psi(
    some: tuple[float, float, float, int], full: tuple[float, float, float, int]
) -> v2pb.PSIStats:
    def data(values: tuple[float, float, float, int]) -> v2pb.PSIData:
        return v2pb.PSIData(avg10=values[0], avg60=values[1], avg300=values[2], total=values[3])

    return v2pb.PSIStats(some=data(some), full=data(full))


def test_v2_stats_every_field(tmp_path: Path) -> None:
    write_tree(tmp_path / "ctr/abc", V2_FILES)
    m = CgroupV2("/ctr/abc", str(tmp_path)).stats()
    memory: dict[str, Any] = {key: 1000001 + i for i, key in enumerate(V2_MEMORY_KEYS)}
    expected = v2pb.Metrics(
        pids=v2pb.PidsStat(current=7, limit=MAX64),  # v2: "max" is the largest uint64
        cpu=v2pb.CPUStat(
            usage_usec=4813941,
            user_usec=3563014,
            system_usec=1250927,
            nr_periods=11,
            nr_throttled=2,
            throttled_usec=39512,
            psi=psi(some=(1.25, 0.5, 0.1, 123456), full=(0, 0, 0, 0)),
        ),
        memory=v2pb.MemoryStat(
            **memory,
            usage=23891968,
            usage_limit=MAX64,
            swap_usage=4096,
            swap_limit=536870912,
            max_usage=31457280,  # memory.peak
            swap_max_usage=8192,
            psi=psi(some=(12.34, 5.67, 1.01, 987654321), full=(10, 4, 0.75, 876543210)),
        ),
        rdma=v2pb.RdmaStat(
            current=[v2pb.RdmaEntry(device="mlx4_0", hca_handles=2, hca_objects=2000)],
            limit=[v2pb.RdmaEntry(device="mlx4_0", hca_handles=MAX32, hca_objects=10000)],
        ),
        io=v2pb.IOStat(
            usage=[
                v2pb.IOEntry(
                    major=8, minor=0, rbytes=1459200, wbytes=314773504, rios=192, wios=353
                ),
                v2pb.IOEntry(major=254, minor=16, rbytes=4096, wbytes=0, rios=1, wios=0),
            ],
            psi=psi(some=(0, 0.02, 0, 4242), full=(0, 0.01, 0, 4000)),
        ),
        hugetlb=[
            v2pb.HugeTlbStat(current=0, max=1073741824, pagesize="1GB"),
            v2pb.HugeTlbStat(current=2097152, max=MAX64, pagesize="2MB"),
        ],
        memory_events=v2pb.MemoryEvents(low=1, high=2, max=3, oom=4, oom_kill=5),
    )
    assert m == expected
    assert v2pb.Metrics.FromString(m.SerializeToString()) == expected
    assert CgroupV2.type_url == "io.containerd.cgroups.v2.Metrics"


def test_v2_sparse_cgroup(tmp_path: Path) -> None:
    # cpu/memory not enabled: their .stat files are not read (as in the library),
    # but the single-value files still are; no memory.events -> no memory_events.
    files = dict(V2_FILES, **{"cgroup.controllers": "pids\n"})
    for name in ("memory.events", "io.stat", "rdma.current", "rdma.max", "pids.max"):
        del files[name]
    for name in ("memory.peak", "memory.swap.peak", "cpu.pressure", "io.pressure"):
        del files[name]  # older kernels, or PSI compiled out
    files = {k: v for k, v in files.items() if not k.startswith("hugetlb.")}
    write_tree(tmp_path / "c", files)
    m = CgroupV2("c", str(tmp_path)).stats()
    for name in ("pids", "cpu", "memory", "io", "rdma"):
        assert m.HasField(name), name
    assert not m.HasField("memory_events")
    assert m.pids == v2pb.PidsStat(current=7, limit=0)
    assert m.cpu == v2pb.CPUStat() and not m.cpu.HasField("psi")
    assert m.memory == v2pb.MemoryStat(
        usage=23891968,
        usage_limit=MAX64,
        swap_usage=4096,
        swap_limit=536870912,
        psi=psi(some=(12.34, 5.67, 1.01, 987654321), full=(10, 4, 0.75, 876543210)),
    )
    assert m.memory.max_usage == 0 and m.memory.swap_max_usage == 0  # no *.peak files
    assert m.io == v2pb.IOStat() and m.rdma == v2pb.RdmaStat() and not m.hugetlb
    assert not m.io.HasField("psi")


def test_v2_empty_memory_events_and_garbage(tmp_path: Path) -> None:
    files = dict(V2_FILES, **{"memory.events": "", "memory.current": "lots\n"})
    files["io.stat"] = "8:0 rbytes=1 wbytes=x rios=2\nnot-a-device\nx:0 rbytes=5\n9:9 rbytes=9\n"
    write_tree(tmp_path / "c", files)
    m = CgroupV2("/c", str(tmp_path)).stats()
    assert not m.HasField("memory_events")
    assert m.memory.usage == 0
    # an unparsable device ends io.stat parsing, as in the library
    assert list(m.io.usage) == [v2pb.IOEntry(major=8, minor=0, rbytes=1, rios=2)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Linux < 5.13 has no "full" line in cpu.pressure
        ("some avg10=0.50 avg60=0.25 avg300=0.05 total=77\n", v2pb.PSIStats(
            some=v2pb.PSIData(avg10=0.5, avg60=0.25, avg300=0.05, total=77))),
        ("", v2pb.PSIStats()),  # present but empty: an empty message, as in the library
        # unknown keys and lines are skipped
        ("some avg10=1.00 future=3 total=5\nwhat 1\n\n", v2pb.PSIStats(
            some=v2pb.PSIData(avg10=1.0, total=5))),
        ("some avg10=x avg60=0.00 avg300=0.00 total=1\n", None),  # unparsable: left out
        ("some avg10=0.00 total=-\n", None),
        ("full avg10\n", None),
    ],
)  # fmt: skip
def test_v2_pressure_parsing(tmp_path: Path, text: str, expected: v2pb.PSIStats | None) -> None:
    write_tree(tmp_path / "c", {"cgroup.controllers": "", "memory.pressure": text})
    m = CgroupV2("/c", str(tmp_path)).stats()
    if expected is None:
        assert not m.memory.HasField("psi")
    else:
        assert m.memory.HasField("psi") and m.memory.psi == expected
        assert m.memory.psi.HasField("full") == expected.HasField("full")
    assert not m.cpu.HasField("psi") and not m.io.HasField("psi")  # no such files


def test_v2_vanished_cgroup_raises_gone(tmp_path: Path) -> None:
    cg = CgroupV2("/ctr/gone", str(tmp_path))
    assert not cg.exists()
    with pytest.raises(CgroupGone):
        cg.stats()


# --------------------------------------------------------------------------- v2 OOM watcher

EVENTS = "low 0\nhigh 0\nmax {max}\noom {oom}\noom_kill {kill}\noom_group_kill 0\n"


def rewrite(path: Path, text: str) -> None:
    # In place (IN_MODIFY on the watched inode), as the kernel updates the file.
    with open(path, "r+") as f:
        f.truncate()
        f.write(text)


class Watch:
    """Runs a watcher in a nursery and records its calls and its end."""

    def __init__(self) -> None:
        self.calls = 0
        self.done = trio.Event()

    def on_oom(self) -> None:
        self.calls += 1

    async def run_v2(self, d: Path) -> None:
        await watch_oom_v2(str(d), self.on_oom)
        self.done.set()

    async def run_v1(self, d: str) -> None:
        await watch_oom_v1(d, self.on_oom)
        self.done.set()


def v2_cgroup(tmp_path: Path, kill: int = 0, populated: int = 1) -> Path:
    d = tmp_path / "cg"
    write_tree(
        d,
        {
            "memory.events": EVENTS.format(max=0, oom=kill, kill=kill),
            "cgroup.events": f"populated {populated}\nfrozen 0\n",
        },
    )
    return d


async def test_oom_v2_reports_each_new_kill_and_stops_when_unpopulated(tmp_path: Path) -> None:
    d = v2_cgroup(tmp_path)
    w = Watch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.run_v2, d)
        await settle()
        assert w.calls == 0 and not w.done.is_set()
        rewrite(d / "memory.events", EVENTS.format(max=3, oom=1, kill=1))
        await settle()
        assert w.calls == 1
        rewrite(d / "memory.events", EVENTS.format(max=9, oom=1, kill=1))  # no new kill
        await settle()
        assert w.calls == 1
        rewrite(d / "memory.events", EVENTS.format(max=9, oom=3, kill=3))  # two more: one event
        await settle()
        assert w.calls == 2
        rewrite(d / "cgroup.events", "populated 0\nfrozen 0\n")
        with trio.fail_after(5):
            await w.done.wait()
    assert w.calls == 2


async def test_oom_v2_earlier_kill_and_removal(tmp_path: Path) -> None:
    d = v2_cgroup(tmp_path, kill=2)
    w = Watch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.run_v2, d)
        await settle()
        assert w.calls == 1 and not w.done.is_set()  # a kill before the watch began
        (d / "memory.events").unlink()  # the cgroup went away (IN_IGNORED)
        with trio.fail_after(5):
            await w.done.wait()


async def test_oom_v2_returns_at_once_for_empty_or_missing_cgroup(tmp_path: Path) -> None:
    w = Watch()
    with trio.fail_after(5):
        await w.run_v2(v2_cgroup(tmp_path, populated=0))
        await w.run_v2(tmp_path / "missing")
        await w.run_v1(str(tmp_path / "missing"))
    assert w.calls == 0


async def test_oom_v2_cancellation_closes_the_fd(tmp_path: Path) -> None:
    d = v2_cgroup(tmp_path)
    before = set(os.listdir("/proc/self/fd"))
    with trio.move_on_after(0.1):
        await watch_oom_v2(str(d), lambda: None)
    assert set(os.listdir("/proc/self/fd")) <= before


# --------------------------------------------------------------------------- shim placement


def placement_tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    mi = tmp_path / "mountinfo"
    v1 = ["cpu,cpuacct", "memory", "pids", "devices", "systemd"]
    text = mountinfo_for(root, unified=False, v1=v1)
    text += f"70 22 0:70 / {tmp_path}/elsewhere/net_cls rw - cgroup cgroup rw,net_cls\n"
    mi.write_text(text)
    for name in [*v1, "unified"]:
        (root / name).mkdir(parents=True)
    (root / "cpu").symlink_to("cpu,cpuacct")
    for name in ("cpu,cpuacct", "memory", "pids", "systemd", "unified"):
        write_tree(root / name, {"shim/cgroup.procs": ""})
    write_tree(tmp_path / "elsewhere/net_cls", {"shim/cgroup.procs": ""})
    return root, mi


def test_move_to_cgroup_v1_every_hierarchy_with_the_directory(tmp_path: Path) -> None:
    root, mi = placement_tree(tmp_path)
    written = move_to_cgroup(4242, "/shim", str(root), str(mi))
    expected = [
        str(root / n / "shim/cgroup.procs") for n in ("cpu,cpuacct", "memory", "pids", "systemd")
    ]
    assert written == expected
    for path in expected:
        assert Path(path).read_text() == "4242"
    # not the unified hierarchy of a hybrid system, not hierarchies elsewhere
    assert (root / "unified/shim/cgroup.procs").read_text() == ""
    assert (tmp_path / "elsewhere/net_cls/shim/cgroup.procs").read_text() == ""
    assert not (root / "devices/shim").exists()


def test_move_to_cgroup_v2(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    mi = tmp_path / "mountinfo"
    mi.write_text(mountinfo_for(root, unified=True))
    write_tree(root, {"system.slice/shim.slice/cgroup.procs": ""})
    written = move_to_cgroup(17, "system.slice/shim.slice", str(root), str(mi))
    assert written == [str(root / "system.slice/shim.slice/cgroup.procs")]
    assert Path(written[0]).read_text() == "17"
    with pytest.raises(CgroupError, match="does not exist"):
        move_to_cgroup(17, "/nope", str(root), str(mi))


def test_move_to_cgroup_errors(tmp_path: Path) -> None:
    root, mi = placement_tree(tmp_path)
    with pytest.raises(CgroupError, match="'/absent' does not exist"):
        move_to_cgroup(1, "/absent", str(root), str(mi))
    (root / "memory/shim/cgroup.procs").unlink()  # directory without the knob
    with pytest.raises(CgroupError, match=r"cannot move pid 1 into .*memory/shim/cgroup\.procs"):
        move_to_cgroup(1, "/shim", str(root), str(mi))


def test_module_import_stays_light() -> None:
    # move_to_cgroup runs in `start`, which must import neither trio nor protobuf.
    code = "import shimv2.cgroups, sys, json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy = [m for m in json.loads(out.stdout) if m.split(".")[0] in ("trio", "google", "psutil")]
    assert heavy == []


# --------------------------------------------------------------------------- real cgroups (v1)

V1_ROOT = "/sys/fs/cgroup"

# Unified-only hosts (systemd + cgroup v2) have no v1 memory hierarchy to test with.
needs_v1 = pytest.mark.skipif(
    cgroups.is_unified() or not os.path.isdir(os.path.join(V1_ROOT, "memory")),
    reason="no cgroup v1 memory hierarchy under /sys/fs/cgroup (unified cgroup v2 host)",
)


def make_v1_cgroups(name: str, controllers: Iterable[str]) -> list[str]:
    made: list[str] = []
    for controller in controllers:
        hierarchy = os.path.join(V1_ROOT, controller)
        if not os.path.isdir(hierarchy):
            cleanup_cgroups_sync(made)
            pytest.fail(f"cgroup v1 hierarchy {hierarchy} is not mounted here")
        path = os.path.join(hierarchy, name)
        try:
            os.mkdir(path)
        except OSError as e:
            cleanup_cgroups_sync(made)
            pytest.fail(f"cannot create cgroup {path}: {e} (needs root and cgroup v1)")
        made.append(path)
    return made


def cleanup_cgroups_sync(paths: Iterable[str]) -> None:
    for path in paths:
        if os.path.isdir(path):
            os.rmdir(path)


async def remove_cgroups(paths: Iterable[str]) -> None:
    """rmdir, retrying while the kernel still counts exited tasks (EBUSY)."""
    for path in paths:
        with trio.fail_after(10):
            while os.path.isdir(path):
                try:
                    os.rmdir(path)
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    await trio.sleep(0.05)


JOIN_AND_EXEC = 'for f; do echo $$ > "$f" || exit 97; done; exec "$0"'


async def wait_for(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.01)


@needs_v1
async def test_v1_stats_of_a_real_process() -> None:
    name = f"pyshim-test-{secrets.token_hex(4)}"
    dirs = make_v1_cgroups(name, ("pids", "cpu", "cpuacct", "memory", "blkio"))
    procs = [os.path.join(d, "cgroup.procs") for d in dirs]
    # sh joins the cgroups, then execs sleep inside them (its memory is charged there).
    child = subprocess.Popen(["sh", "-c", f"{JOIN_AND_EXEC} 30", "sleep", *procs])
    try:
        # Exec'd and asleep: its CPU time is only charged once it leaves the CPU.
        stat = Path(f"/proc/{child.pid}/stat")
        await wait_for(lambda: stat.read_text().split()[1:3] == ["(sleep)", "S"])
        paths = cgroup_paths(child.pid)
        assert paths.controllers["memory"] == f"/{name}"
        cg = detect(child.pid)
        assert isinstance(cg, CgroupV1)
        m = cg.stats()
        assert m.pids == v1pb.PidsStat(current=1, limit=0)
        assert m.cpu.usage.total > 0
        assert sum(m.cpu.usage.per_cpu) == m.cpu.usage.total
        assert len(m.cpu.usage.per_cpu) >= 1
        assert m.memory.usage.usage > 0
        assert m.memory.usage.limit == m.memory.hierarchical_memory_limit > 0
        # (memory.stat counters are flushed lazily by the kernel: they may still read 0)
        assert m.HasField("memory_oom_control") and m.memory_oom_control.oom_kill == 0
        assert m.HasField("blkio")
        assert not m.hugetlb  # no hugetlb hierarchy for this cgroup
    finally:
        child.kill()
        child.wait()
        await remove_cgroups(dirs)


@needs_v1
async def test_oom_v1_real() -> None:
    name = f"pyshim-test-{secrets.token_hex(4)}"
    [d] = make_v1_cgroups(name, ("memory",))
    procs = os.path.join(d, "cgroup.procs")
    try:
        limit = str(16 << 20)
        with open(os.path.join(d, "memory.limit_in_bytes"), "w") as f:
            f.write(limit)
        if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):
            with open(os.path.join(d, "memory.memsw.limit_in_bytes"), "w") as f:
                f.write(limit)  # no escape into swap
        w = Watch()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.run_v1, d)
            await settle()
            assert not w.done.is_set(), "watcher did not start"
            # Joins the cgroup, then touches 64 MiB under a 16 MiB limit.
            hog = [sys.executable, "-c", "b = b'x' * (64 << 20)"]
            argv = ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", procs, *hog]
            with trio.fail_after(30):
                proc = await trio.run_process(argv, check=False)
            assert proc.returncode == -signal.SIGKILL, f"child not OOM-killed: {proc.returncode}"
            with trio.fail_after(10):
                while w.calls == 0:
                    await trio.sleep(0.01)
            m = CgroupV1({"memory": f"/{name}"}).stats()
            assert m.memory_oom_control.oom_kill >= 1
            assert m.memory.usage.limit == m.memory.usage.max == 16 << 20
            # Removing the cgroup signals the eventfd: the watcher ends by itself.
            await remove_cgroups([d])
            with trio.fail_after(10):
                await w.done.wait()
        assert w.calls >= 1
    finally:
        await remove_cgroups([d])


# --------------------------------------------------------------------------- real cgroups (v2)

needs_v2 = pytest.mark.skipif(
    not cgroups.is_unified(), reason="/sys/fs/cgroup is not a unified cgroup v2 hierarchy"
)


def make_v2_cgroup(name: str, controllers: Iterable[str]) -> str:
    """A cgroup directly under the v2 root with ``controllers`` enabled for it."""
    enabled = Path(cgroups.DEFAULT_ROOT, "cgroup.subtree_control").read_text().split()
    missing = [c for c in controllers if c not in enabled]
    if missing:
        pytest.fail(
            f"controllers {missing} not enabled in {cgroups.DEFAULT_ROOT}/cgroup.subtree_control"
        )
    path = os.path.join(cgroups.DEFAULT_ROOT, name)
    os.mkdir(path)
    return path


@pytest.mark.node
@needs_v2
async def test_v2_stats_of_a_real_process() -> None:
    d = make_v2_cgroup(f"pyshim-test-{secrets.token_hex(4)}", ("cpu", "memory", "pids", "io"))
    child = subprocess.Popen(["sh", "-c", f"{JOIN_AND_EXEC} 30", "sleep", f"{d}/cgroup.procs"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        await wait_for(lambda: stat.read_text().split()[1:3] == ["(sleep)", "S"])
        cg = detect(child.pid)
        assert isinstance(cg, CgroupV2) and cg.dir == d
        m = cg.stats()
        assert m.pids == v2pb.PidsStat(current=1, limit=MAX64)
        assert m.cpu.usage_usec > 0
        assert m.memory.usage > 0 and m.memory.usage_limit == MAX64
        if os.path.exists(f"{d}/memory.peak"):  # Linux 5.19+
            assert m.memory.max_usage >= m.memory.usage
        if os.path.exists(f"{d}/memory.pressure"):  # PSI built in and on
            for stat_psi in (m.cpu.psi, m.memory.psi, m.io.psi):
                assert stat_psi.HasField("some"), m
        assert m.memory_events.oom_kill == 0
    finally:
        child.kill()
        child.wait()
        await remove_cgroups([d])


@pytest.mark.node
@needs_v2
async def test_oom_v2_real() -> None:
    d = make_v2_cgroup(f"pyshim-test-{secrets.token_hex(4)}", ("memory",))
    procs = os.path.join(d, "cgroup.procs")
    # A sleeper keeps the cgroup populated, so the watcher outlives the hog.
    sleeper = subprocess.Popen(["sh", "-c", f"{JOIN_AND_EXEC} 60", "sleep", procs])
    try:
        await wait_for(lambda: Path(d, "cgroup.procs").read_text().strip() != "")
        Path(d, "memory.max").write_text(str(16 << 20))
        if os.path.exists(os.path.join(d, "memory.swap.max")):
            Path(d, "memory.swap.max").write_text("0")  # no escape into swap
        w = Watch()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.run_v2, Path(d))
            await settle()
            assert not w.done.is_set(), "watcher did not start"
            hog = [sys.executable, "-c", "b = b'x' * (64 << 20)"]
            argv = ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", procs, *hog]
            with trio.fail_after(60):
                proc = await trio.run_process(argv, check=False)
            assert proc.returncode == -signal.SIGKILL, f"child not OOM-killed: {proc.returncode}"
            with trio.fail_after(10):
                while w.calls == 0:
                    await trio.sleep(0.01)
            m = CgroupV2("/" + os.path.basename(d)).stats()
            assert m.memory_events.oom_kill >= 1
            assert m.memory.usage_limit == 16 << 20
            # The last process gone ("populated 0" in cgroup.events) ends the watcher.
            sleeper.kill()
            sleeper.wait()
            with trio.fail_after(10):
                await w.done.wait()
        assert w.calls >= 1
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        await remove_cgroups([d])


def test_join_cgroups_moves_into_each_hierarchy_that_differs(tmp_path: Path) -> None:
    """What the fork server's child does with the caller's /proc/PID/cgroup: v1
    hierarchies (co-mounted and named ones) and the cgroup2 one, with a mount
    that is a subtree (as inside a container)."""
    root = tmp_path / "cg"
    for d in ("cpu,cpuacct/caller", "systemd/caller", "pids/same", "unified/caller"):
        (root / d).mkdir(parents=True)
        (root / d / "cgroup.procs").write_text("")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"30 23 0:28 / {root} rw - tmpfs tmpfs rw\n"
        f"32 30 0:29 / {root}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        f"33 30 0:30 / {root}/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        f"34 30 0:31 / {root}/pids rw - cgroup cgroup rw,pids\n"
        f"35 30 0:32 /sub {root}/unified rw - cgroup2 cgroup2 rw\n"
    )
    own = tmp_path / "own"
    own.write_text("3:cpu,cpuacct:/\n2:name=systemd:/\n1:pids:/same\n0::/sub\n")
    caller = "3:cpu,cpuacct:/caller\n2:name=systemd:/caller\n1:pids:/same\n0::/sub/caller\n"
    cgroups.join_cgroups(caller, pid=4242, mountinfo=str(mountinfo), own_cgroup_file=str(own))
    assert (root / "cpu,cpuacct/caller/cgroup.procs").read_text() == "4242"
    assert (root / "systemd/caller/cgroup.procs").read_text() == "4242"
    assert (root / "unified/caller/cgroup.procs").read_text() == "4242"  # mount root /sub
    assert (root / "pids/same/cgroup.procs").read_text() == ""  # already there: untouched


def test_join_cgroups_without_a_mount_for_a_hierarchy_fails(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("")
    own = tmp_path / "own"
    own.write_text("0::/\n")
    with pytest.raises(cgroups.CgroupError, match="no mount"):
        cgroups.join_cgroups(
            "9:bogus:/x\n", pid=1, mountinfo=str(mountinfo), own_cgroup_file=str(own)
        )


def test_kv_reader_rereads_one_open_file(tmp_path: Path) -> None:
    path = tmp_path / "memory.events"
    path.write_text("oom 0\noom_kill 0\n")
    reader = _KvReader(str(path))
    assert reader.read() == {"oom": 0, "oom_kill": 0}
    with open(path, "r+") as f:  # the kernel rewrites a cgroup file in place
        f.write("oom 1\noom_kill 2\n")
    assert reader.read() == {"oom": 1, "oom_kill": 2}
    reader.close()
    assert reader.read() == {"oom": 1, "oom_kill": 2}  # closed: read without an fd
    assert reader._fd < 0
    path.unlink()
    assert reader.read() is None
    assert _KvReader(str(tmp_path / "gone")).read() is None
