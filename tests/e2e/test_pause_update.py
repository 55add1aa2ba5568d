"""Pause, Resume and Update end to end, the same checks for the Go shim and pyshim.

ctr 1.6 has no ``task update``: Update is called over ttrpc on the shim socket
(the bundle's ``address``), as containerd would, with the resources as a JSON
LinuxResources Any.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from google.protobuf import any_pb2, empty_pb2

from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.ttrpc import Code, TTRPCError, connect

from .cgroupfs import frozen, read_limit
from .harness import PAUSED, RUNNING, STOPPED, Containerd, exit_code_from_task_rm

pytestmark = pytest.mark.e2e

RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def run_sleeper(c: Containerd, runtime: str, rootfs: Path, cid: str) -> int:
    r = c.ctr("run", "-d", "--runtime", runtime, "--rootfs", str(rootfs), cid, "/bin/sleep", "600")
    assert r.returncode == 0, r.stderr
    c.wait_task_status(cid, RUNNING, timeout=10)
    pid = c.task_pid(cid)
    assert pid
    return pid


def update(c: Containerd, cid: str, type_url: str, value: bytes) -> None:
    address, service = c.shim_address(cid), c.task_service(cid)

    async def call() -> None:
        async with connect(address) as client:
            request = api.UpdateTaskRequest(
                id=cid, resources=any_pb2.Any(type_url=type_url, value=value)
            )
            await client.call(service, "Update", request, empty_pb2.Empty, timeout=10)

    trio.run(call)


@pytest.mark.node
def test_pause_resume(containerd: Containerd, runtime: str, rootfs: Path, cid: str) -> None:
    watcher = containerd.events()
    try:
        pid = run_sleeper(containerd, runtime, rootfs, cid)
        assert containerd.ctr("task", "pause", cid).returncode == 0
        assert containerd.task_status(cid) == PAUSED
        assert frozen(pid)  # the v1 or v2 freezer
        r = containerd.ctr("task", "pause", cid)
        assert r.returncode != 0 and "cannot pause a paused container" in r.stderr, r.stderr
        assert containerd.ctr("task", "resume", cid).returncode == 0
        assert containerd.tasks()[cid] == (pid, RUNNING)
        assert not frozen(pid)
        r = containerd.ctr("task", "resume", cid)
        assert r.returncode != 0 and "cannot resume a running process" in r.stderr, r.stderr
        watcher.wait_for(cid, "/tasks/resumed")
    finally:
        watcher.stop()
    assert watcher.topics(cid) == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/paused",
        "/tasks/resumed",
    ]
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    containerd.ctr("task", "rm", cid)
    containerd.ctr("container", "rm", cid)
    containerd.assert_no_leaks(cid)


def test_paused_container_killed_and_deleted(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    run_sleeper(containerd, runtime, rootfs, cid)
    assert containerd.ctr("task", "pause", cid).returncode == 0
    assert containerd.ctr("task", "kill", "-s", "SIGKILL", cid).returncode == 0
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    r = containerd.ctr("task", "rm", cid)
    assert r.returncode == 0, r.stderr
    assert exit_code_from_task_rm(r.stderr) == 137
    assert containerd.ctr("container", "rm", cid).returncode == 0
    containerd.assert_no_leaks(cid)


@pytest.mark.node
def test_update_pids_and_memory_limits(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    pid = run_sleeper(containerd, runtime, rootfs, cid)
    update(containerd, cid, RESOURCES_URL, json.dumps({"pids": {"limit": 42}}).encode())
    assert read_limit(pid, "pids", "pids.max", "pids.max") == "42"
    resources = {"memory": {"limit": 64 << 20}}
    update(containerd, cid, RESOURCES_URL, json.dumps(resources).encode())
    assert read_limit(pid, "memory", "memory.limit_in_bytes", "memory.max") == str(64 << 20)
    assert read_limit(pid, "pids", "pids.max", "pids.max") == "42"  # left alone
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    r = containerd.ctr("task", "rm", cid)
    assert r.returncode == 0, r.stderr
    containerd.ctr("container", "rm", cid)
    containerd.assert_no_leaks(cid)


@pytest.mark.parametrize(
    ("type_url", "value"),
    [
        (RESOURCES_URL, b"{not json"),
        (RESOURCES_URL, b"[1, 2]"),
        ("containerd.runc.v1.Options", b""),
    ],
)
def test_update_bad_resources_is_invalid_argument(
    containerd: Containerd, rootfs: Path, cid: str, type_url: str, value: bytes
) -> None:
    # pyshim only: the Go shim answers these with UNKNOWN.
    run_sleeper(containerd, "io.containerd.pyshim.v2", rootfs, cid)
    with pytest.raises(TTRPCError) as info:
        update(containerd, cid, type_url, value)
    assert info.value.code == Code.INVALID_ARGUMENT, info.value
    assert containerd.task_status(cid) == RUNNING  # nothing else broke
    containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    containerd.ctr("task", "rm", cid)
    containerd.ctr("container", "rm", cid)
