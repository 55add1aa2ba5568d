"""PYSHIM_KSM=1 through a real containerd (pyshim only: the Go shim has no such
option): the fork server and the daemons it forks mark their private writable
mappings mergeable (``mg`` in /proc/PID/smaps' VmFlags); without it nothing is
marked. Whether ksmd then merges is the kernel's business (bench/suite.py
measures it); the node's KSM settings are never touched here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimv2 import ksm

from .forkservers import Private
from .harness import RUNNING, STOPPED, Containerd, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.node,  # also on the systemd + cgroup v2 node (make test-node)
    pytest.mark.skipif(not Path(ksm.SYSFS).exists(), reason="kernel without KSM"),
]

PYSHIM = "io.containerd.pyshim.v2"


def marked(pid: int) -> dict[str, bool]:
    """Per kind of mapping, whether any of them is marked mergeable."""
    found: dict[str, bool] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else "anonymous"
            name = name if name.startswith(("[", "anonymous")) else "file"
        elif line.startswith("VmFlags:"):
            found[name] = found.get(name, False) or "mg" in head[1:]
    return found


@pytest.fixture
def with_ksm(e2e_tools: None) -> Iterator[Private]:
    p = Private({ksm.ENV: "1"})
    yield p
    p.close()


@pytest.fixture
def without_ksm(e2e_tools: None) -> Iterator[Private]:
    p = Private({})
    yield p
    p.close()


def start_served_daemon(p: Private, rootfs: Path) -> tuple[str, int]:
    """A container whose daemon the fork server forked (the first start of a
    fresh server directory runs without one and launches it)."""
    first = f"ksm-first-{uuid.uuid4().hex[:8]}"
    p.c.ctr("run", "--rm", "--runtime", PYSHIM, "--rootfs", str(rootfs), first, "/bin/true")
    wait_until(lambda: p.server_pid() is not None, timeout=30, what="fork server up")
    cid = f"ksm-{uuid.uuid4().hex[:8]}"
    p.c.ctr("run", "-d", "--runtime", PYSHIM, "--rootfs", str(rootfs), cid, "/bin/sleep", "300")
    p.c.wait_task_status(cid, {RUNNING}, timeout=10)
    [shim] = p.c.shim_processes(cid)
    assert shim.ppid() == p.server_pid(), "the daemon is not the fork server's child"
    return cid, shim.pid


def remove(c: Containerd, cid: str) -> None:
    c.ctr("task", "kill", "-s", "SIGKILL", cid)
    c.wait_task_status(cid, {STOPPED}, timeout=10)
    c.ctr("task", "rm", cid)
    c.ctr("container", "rm", cid)


def test_the_fork_server_and_its_daemons_mark_their_private_mappings(
    with_ksm: Private, rootfs: Path
) -> None:
    cid, daemon = start_served_daemon(with_ksm, rootfs)
    server = with_ksm.server_pid()
    assert server is not None
    flags = marked(server)
    assert flags["[heap]"] and flags["anonymous"] and flags["file"], flags
    assert not flags["[stack]"], flags
    # the daemon marks once idle (2 s after serving and after the last request)
    wait_until(
        lambda: marked(daemon)["[heap]"] and marked(daemon)["anonymous"],
        timeout=30,
        what="the daemon's heap and arenas marked mergeable",
    )
    assert not marked(daemon)["[stack]"]
    # runc and the container were exec'd: nothing of theirs is marked
    task_pid = with_ksm.c.task_pid(cid)
    assert task_pid
    assert not any(marked(task_pid).values())
    remove(with_ksm.c, cid)


def test_nothing_is_marked_without_the_option(without_ksm: Private, rootfs: Path) -> None:
    cid, daemon = start_served_daemon(without_ksm, rootfs)
    server = without_ksm.server_pid()
    assert server is not None
    assert not any(marked(server).values())
    assert not any(marked(daemon).values())
    remove(without_ksm.c, cid)
