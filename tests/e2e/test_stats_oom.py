"""Stats (``ctr task metrics``, the shim's Stats) and OOM events, the same checks
for the Go shim and pyshim.

On a cgroup v1 host these cover ``io.containerd.cgroups.v1.Metrics`` and the
``memory.oom_control`` eventfd watcher; on a unified cgroup v2 node (``make
test-node``) ``io.containerd.cgroups.v2.Metrics`` and ``memory.events``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from shimv2.api.containerd.cgroups.v1 import metrics_pb2 as v1pb
from shimv2.api.containerd.cgroups.v2 import metrics_pb2 as v2pb
from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.ttrpc import connect

from .cgroupfs import UNIFIED, cgroup_dir
from .harness import RUNNING, STOPPED, Containerd, go_shim_limitation, wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.node
def test_metrics(containerd: Containerd, runtime: str, rootfs: Path, cid: str) -> None:
    r = containerd.ctr(
        "run", "-d", "--runtime", runtime, "--rootfs", str(rootfs), cid, "/bin/sleep", "600"
    )
    assert r.returncode == 0, r.stderr
    containerd.wait_task_status(cid, RUNNING, timeout=10)
    r = containerd.ctr("task", "metrics", cid)
    assert r.returncode == 0, r.stderr
    values = dict(line.split(None, 1) for line in r.stdout.splitlines()[3:] if line.strip())
    assert int(values["pids.current"]) == 1, r.stdout
    # ctr prints a table per Metrics type, with the cgroup files' names
    usage, cpu = ("memory.usage", "cpu.usage_usec") if UNIFIED else (
        "memory.usage_in_bytes", "cpuacct.usage")  # fmt: skip
    assert int(values[usage]) > 0, r.stdout
    assert int(values[cpu]) > 0, r.stdout
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    assert containerd.ctr("task", "rm", cid).returncode == 0
    r = containerd.ctr("task", "metrics", cid)
    assert r.returncode != 0 and "not found" in r.stderr, r.stderr
    containerd.ctr("container", "rm", cid)
    containerd.assert_no_leaks(cid)


def stats(c: Containerd, cid: str) -> api.StatsResponse:
    """The shim's Stats answer, asked over its socket as containerd asks it."""

    async def call() -> api.StatsResponse:
        async with connect(c.shim_address(cid)) as client:
            request = api.StatsRequest(id=cid)
            response: api.StatsResponse = await client.call(
                c.task_service(cid), "Stats", request, api.StatsResponse, timeout=30
            )
            return response

    return trio.run(call)


@pytest.mark.node
def test_stats_message(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str, request: pytest.FixtureRequest
) -> None:
    # Fills 8 MB and frees it again: the peak stays above the current usage.
    script = "x=$(head -c 8000000 /dev/zero | tr '\\0' a); unset x; exec sleep 600"
    r = containerd.ctr(
        "run", "-d", "--runtime", runtime, "--memory-limit", str(256 << 20),
        "--rootfs", str(rootfs), cid, "/bin/sh", "-c", script,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    containerd.wait_task_status(cid, RUNNING, timeout=10)
    pid = containerd.task_pid(cid)
    assert pid
    comm = Path(f"/proc/{pid}/comm")
    wait_until(lambda: comm.read_text().strip() == "sleep", 60, what="the script to exec sleep")
    any_stats = stats(containerd, cid).stats
    if not UNIFIED:
        assert any_stats.type_url == "io.containerd.cgroups.v1.Metrics"
        m1 = v1pb.Metrics.FromString(any_stats.value)
        assert m1.pids.current == 1
        assert m1.memory.usage.limit == 256 << 20
        assert m1.memory.usage.max >= 8_000_000
    else:
        assert any_stats.type_url == "io.containerd.cgroups.v2.Metrics"
        m = v2pb.Metrics.FromString(any_stats.value)
        assert m.pids.current == 1
        assert m.memory.usage_limit == 256 << 20
        assert m.memory.usage > 0 and m.cpu.usage_usec > 0
        assert m.HasField("memory_events") and m.memory_events.oom_kill == 0
        # The Go shim reports these with containerd/cgroups v3.0.3+ (containerd 2.x;
        # Debian's 1.7.24 package too); upstream 1.7 builds vendor v3.0.2 without them.
        if containerd.version < (2, 0, 0):
            go_shim_limitation(
                request, containerd, runtime, (1, 7),
                "upstream 1.7 builds (cgroups v3.0.2) report no memory.max_usage or PSI",
            )  # fmt: skip
        d = cgroup_dir(pid, "memory")
        if (d / "memory.peak").exists():  # Linux 5.19+
            assert m.memory.max_usage >= 8_000_000 and m.memory.max_usage > m.memory.usage, m
        if (d / "memory.pressure").exists():  # PSI on
            for psi in (m.cpu.psi, m.memory.psi, m.io.psi):
                assert psi.HasField("some"), m
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    assert containerd.ctr("task", "rm", cid).returncode == 0
    containerd.ctr("container", "rm", cid)
    containerd.assert_no_leaks(cid)


@pytest.mark.node
def test_oom_event_before_exit(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    watcher = containerd.events()
    try:
        r = containerd.ctr(
            "run", "--runtime", runtime, "--memory-limit", str(16 << 20),
            "--rootfs", str(rootfs), cid,
            "/bin/sh", "-c", "head -c 200000000 /dev/zero | tail > /dev/null",
            timeout=60,
        )  # fmt: skip
        assert r.returncode == 137, r.stderr
        watcher.wait_for(cid, "/tasks/exit")
    finally:
        watcher.stop()
    topics = watcher.topics(cid)
    assert "/tasks/oom" in topics, topics
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics
    containerd.ctr("container", "rm", cid)  # a foreground `ctr run` deleted the task
    containerd.assert_no_leaks(cid)


def test_pids_attach_exec_ids(containerd: Containerd, runtime: str, rootfs: Path, cid: str) -> None:
    r = containerd.ctr(
        "run", "-d", "--runtime", runtime, "--rootfs", str(rootfs), cid, "/bin/sleep", "600"
    )
    assert r.returncode == 0, r.stderr
    containerd.wait_task_status(cid, RUNNING, timeout=10)
    r = containerd.ctr("task", "exec", "-d", "--exec-id", "ex1", cid, "/bin/sleep", "500")
    assert r.returncode == 0, r.stderr
    init_pid = containerd.task_pid(cid)

    def rows() -> dict[int, str]:
        out = containerd.ctr("task", "ps", cid).stdout.splitlines()[1:]
        return {int(line.split()[0]): line.split(None, 1)[1] for line in out if line.strip()}

    wait_until(lambda: len(rows()) == 2, 10, what="init and exec in `ctr task ps`")
    table = rows()
    assert table.pop(init_pid) == "-"  # the init has no details
    ((_, info),) = table.items()
    # decoded from containerd.runc.v1.ProcessDetails: ctr 1.6 prints `ExecID:ex1`,
    # ctr 1.7 and 2.x `exec_id:"ex1"`
    assert re.search(r'(ExecID:|exec_id:)"?ex1"?', info), info
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    containerd.ctr("task", "rm", cid)
    containerd.ctr("container", "rm", cid)
    containerd.assert_no_leaks(cid)
