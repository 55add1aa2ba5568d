"""Stats (``ctr task metrics``) and OOM events, the same checks for the Go shim and pyshim.

This machine has cgroup v1 hierarchies, so these cover
``io.containerd.cgroups.v1.Metrics`` and the ``memory.oom_control`` eventfd
watcher; the v2 paths are unit-tested on a fake cgroupfs (tests/unit/test_cgroups.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .harness import RUNNING, STOPPED, Containerd, wait_until

pytestmark = pytest.mark.e2e


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
    assert int(values["memory.usage_in_bytes"]) > 0, r.stdout
    assert int(values["cpuacct.usage"]) > 0, r.stdout
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    assert containerd.ctr("task", "rm", cid).returncode == 0
    r = containerd.ctr("task", "metrics", cid)
    assert r.returncode != 0 and "not found" in r.stderr, r.stderr
    containerd.ctr("container", "rm", cid)
    containerd.assert_no_leaks(cid)


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
