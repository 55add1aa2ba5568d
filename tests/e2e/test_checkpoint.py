"""Checkpoint and restore end to end.

Debian's criu 3.17 fails ``criu check`` on this kernel, so a real checkpoint
cannot succeed here. What runs everywhere: the error path (both shims), and the
option mapping through real containerd into runc's command line (pyshim, with
a recording runc wrapper). The full checkpoint → restore cycle runs only where
criu works, and is skipped with criu's own reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from google.protobuf import empty_pb2

from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.ttrpc import connect

from .harness import RUNNING, STOPPED, Containerd

pytestmark = pytest.mark.e2e

PYSHIM = "io.containerd.pyshim.v2"
TASK = "containerd.task.v2.Task"


def criu_problem() -> str | None:
    """None when criu can checkpoint on this machine, else why not."""
    criu = shutil.which("criu")
    if criu is None:
        return "criu is not installed"
    r = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"`criu check` fails on this kernel: {(r.stderr or r.stdout).strip()[-300:]}"
    return None


def run_sleeper(c: Containerd, runtime: str, rootfs: Path, cid: str, *extra: str) -> None:
    r = c.ctr("run", "-d", "--runtime", runtime, *extra, "--rootfs", str(rootfs), cid,
              "/bin/sleep", "600")  # fmt: skip
    assert r.returncode == 0, r.stderr
    c.wait_task_status(cid, RUNNING, timeout=10)


def kill_and_remove(c: Containerd, cid: str) -> None:
    c.ctr("task", "kill", "-s", "SIGKILL", cid)
    c.wait_task_status(cid, STOPPED, timeout=10)
    c.ctr("task", "rm", cid)
    c.ctr("container", "rm", cid)
    c.assert_no_leaks(cid)


def test_checkpoint_failure_is_clear(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str, tmp_path: Path
) -> None:
    problem = criu_problem()
    if problem is None:
        pytest.skip("criu works here: the failure path cannot be provoked this way")
    run_sleeper(containerd, runtime, rootfs, cid)
    r = containerd.ctr("task", "checkpoint", "--image-path", str(tmp_path / "img"), cid)
    assert r.returncode != 0
    assert "criu-dump.log" in r.stderr, r.stderr
    assert containerd.task_status(cid) == RUNNING  # nothing else broke
    kill_and_remove(containerd, cid)


def test_checkpoint_reaches_runc(
    containerd: Containerd, rootfs: Path, cid: str, tmp_path: Path
) -> None:
    """The command line real containerd + pyshim give runc for ``ctr task checkpoint``.

    ctr 1.6 builds CheckpointOptions only for io.containerd.runc.* and runtime v1,
    so for pyshim its --image-path/--work-path/--exit never leave ctr; the image
    path is the directory containerd itself passes. The mapping of every option
    is unit-tested (tests/unit/test_checkpoint.py).
    """
    record = tmp_path / "runc-args.txt"
    wrapper = tmp_path / "runc"
    wrapper.write_text(f'#!/bin/sh\nprintf \'%s\\n\' "$*" >> {record}\nexec runc "$@"\n')
    wrapper.chmod(0o755)
    config = tmp_path / "pyshim.toml"
    config.write_text(f'BinaryName = "{wrapper}"\n')
    run_sleeper(containerd, PYSHIM, rootfs, cid, "--runtime-config-path", str(config))
    bundle = containerd.bundle_dir(cid)
    containerd.ctr("task", "checkpoint", cid)
    lines = [line for line in record.read_text().splitlines() if " checkpoint " in f" {line} "]
    assert len(lines) == 1, record.read_text()
    args = lines[0].split()
    at = args.index("checkpoint")
    assert args[at + 1] == "--image-path" and args[at + 2].startswith("/"), lines[0]
    assert args[at + 3 : at + 5] == ["--work-path", f"{bundle}/work/criu-work"], lines[0]
    assert args[at + 5 :] == ["--leave-running", cid], lines[0]
    if criu_problem() is not None:
        assert containerd.task_status(cid) == RUNNING  # the failed checkpoint broke nothing
    kill_and_remove(containerd, cid)


def test_checkpoint_and_restore(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str, tmp_path: Path
) -> None:
    problem = criu_problem()
    if problem is not None:
        pytest.skip(problem)
    run_sleeper(containerd, runtime, rootfs, cid)
    image = tmp_path / "img"
    r = containerd.ctr("task", "checkpoint", "--exit", "--image-path", str(image), cid)
    assert r.returncode == 0, r.stderr
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    # Restore into a second container on the same shim, as containerd would:
    # a bundle of our own, then Create with `checkpoint` set and Start.
    bundle = tmp_path / "restored"
    bundle.mkdir()
    spec = json.loads((containerd.bundle_dir(cid) / "config.json").read_text())
    spec["root"] = {"path": str(rootfs)}
    (bundle / "config.json").write_text(json.dumps(spec))
    address = containerd.shim_address(cid)

    async def restore() -> int:
        async with connect(address) as client:
            create = api.CreateTaskRequest(id=f"{cid}-r", bundle=str(bundle), checkpoint=str(image))
            await client.call(TASK, "Create", create, api.CreateTaskResponse, timeout=30)
            started = await client.call(
                TASK, "Start", api.StartRequest(id=f"{cid}-r"), api.StartResponse, timeout=30
            )
            state = await client.call(
                TASK, "State", api.StateRequest(id=f"{cid}-r"), api.StateResponse, timeout=5
            )
            assert state.status == 2
            await client.call(
                TASK, "Kill", api.KillRequest(id=f"{cid}-r", signal=9), empty_pb2.Empty
            )
            await client.call(TASK, "Wait", api.WaitRequest(id=f"{cid}-r"), api.WaitResponse)
            await client.call(TASK, "Delete", api.DeleteRequest(id=f"{cid}-r"), api.DeleteResponse)
            return int(started.pid)

    assert trio.run(restore) > 0
    containerd.ctr("task", "rm", cid)
    containerd.ctr("container", "rm", cid)
