"""Core end-to-end checks, run identically for the Go shim and pyshim.

Every test is parametrized by the ``runtime`` fixture (ids ``go`` and
``pyshim``) and compares against the same expected values, so a pass for both
means the two runtimes agree on output, exit codes and event order.

ctr quirks worked around here (see /work/shared/spec/ctr-quirks.md):
* no environment inside ``ctr run --rootfs`` containers: absolute paths only;
* ctr may lose the tail of a fast-exiting process's output: sleep before exit;
* ``ctr task rm`` exits 0 and reports a non-zero status on stderr only;
* ``sleep`` as PID 1 ignores SIGTERM: use a ``sh`` with a TERM trap and wait
  until the trap is installed (a marker file in the shared rootfs);
* ``ctr shim state`` prints the status as a number (2 = RUNNING).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from .harness import (
    RUNNING,
    STATUS_NUMBERS,
    STOPPED,
    Containerd,
    exit_code_from_task_rm,
    pid_alive,
    wait_until,
)

pytestmark = pytest.mark.e2e

#: /tasks/* topics a plain run produces for the init process, in order
RUN_TOPICS = ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
#: a sh that exits 143 on SIGTERM and says when its trap is installed
TRAP_SCRIPT = 'trap "exit 143" TERM; touch /tmp/{marker}; sleep 60 & wait'


def describe(r: subprocess.CompletedProcess[str]) -> str:
    return f"rc={r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"


def run_detached(c: Containerd, runtime: str, rootfs: Path, cid: str, *cmd: str) -> int:
    r = c.ctr("run", "--runtime", runtime, "-d", "--rootfs", str(rootfs), cid, *cmd, timeout=20)
    assert r.returncode == 0, f"ctr run -d failed: {describe(r)}"
    c.wait_task_status(cid, RUNNING, timeout=10)
    pid = c.task_pid(cid)
    assert pid, f"no pid for {cid}"
    return pid


def run_trap_sh(c: Containerd, runtime: str, rootfs: Path, cid: str) -> int:
    marker = rootfs / "tmp" / f"{cid}.ready"
    pid = run_detached(
        c, runtime, rootfs, cid, "/bin/sh", "-c", TRAP_SCRIPT.format(marker=marker.name)
    )
    wait_until(marker.exists, 10, what=f"TERM trap of {cid} installed")
    return pid


def delete_task(c: Containerd, cid: str) -> int:
    """``ctr task rm`` + ``ctr container rm``; returns the task's exit status."""
    r = c.ctr("task", "rm", cid, timeout=15)
    assert r.returncode == 0, f"ctr task rm failed: {describe(r)}"
    code = exit_code_from_task_rm(r.stderr)
    r = c.ctr("container", "rm", cid, timeout=15)
    assert r.returncode == 0, f"ctr container rm failed: {describe(r)}"
    return code


def kill_and_delete(c: Containerd, cid: str, signal: str = "SIGKILL") -> int:
    r = c.ctr("task", "kill", "-s", signal, cid, timeout=10)
    assert r.returncode == 0, f"ctr task kill failed: {describe(r)}"
    c.wait_task_status(cid, STOPPED, timeout=10)
    return delete_task(c, cid)


# --------------------------------------------------------------------------- tests


def test_run_output_and_exit_code(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    r = containerd.ctr(
        "run", "--runtime", runtime, "--rm", "--rootfs", str(rootfs), cid,
        "/bin/sh", "-c", "echo hello; echo oops >&2; sleep 0.2; exit 3",
        timeout=20,
    )  # fmt: skip
    assert r.returncode == 3, describe(r)
    assert "hello" in r.stdout, describe(r)
    assert "oops" in r.stderr, describe(r)
    assert "hello" not in r.stderr and "oops" not in r.stdout, describe(r)
    assert cid not in containerd.ctr("container", "ls", "-q").stdout.split()
    containerd.assert_no_leaks(cid)


def test_detached_lifecycle_sigterm(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    pid = run_trap_sh(containerd, runtime, rootfs, cid)
    assert containerd.tasks()[cid] == (pid, RUNNING)
    assert pid_alive(pid)
    assert containerd.shim_processes(cid), "no shim process found for a running task"

    r = containerd.ctr("task", "ps", cid, timeout=10)
    assert r.returncode == 0, describe(r)
    pids = [int(line.split()[0]) for line in r.stdout.splitlines()[1:] if line.strip()]
    assert pid in pids, f"init pid {pid} not in `ctr task ps`: {r.stdout!r}"

    r = containerd.ctr("task", "kill", cid, timeout=10)  # default signal: SIGTERM
    assert r.returncode == 0, describe(r)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    assert delete_task(containerd, cid) == 143
    assert containerd.task_status(cid) is None
    containerd.assert_no_leaks(cid)
    assert not pid_alive(pid), f"container init {pid} still alive after task rm"


def test_sigkill_exit_status(containerd: Containerd, runtime: str, rootfs: Path, cid: str) -> None:
    watcher = containerd.events()
    try:
        pid = run_detached(containerd, runtime, rootfs, cid, "/bin/sleep", "60")
        assert kill_and_delete(containerd, cid, "SIGKILL") == 137
        exit_ev = watcher.wait_for(cid, "/tasks/exit")
        delete_ev = watcher.wait_for(cid, "/tasks/delete")
        time.sleep(0.3)  # let stray (duplicate/late) task events show up
    finally:
        watcher.stop()
    assert watcher.topics(cid) == RUN_TOPICS, "\n".join(e.raw for e in watcher.for_container(cid))
    assert exit_ev.data.get("exit_status", 0) == 137
    assert exit_ev.data.get("pid") == pid
    assert delete_ev.data.get("exit_status", 0) == 137
    containerd.assert_no_leaks(cid)


def test_foreground_run_killed_from_other_ctr(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    p = containerd.ctr_popen(
        "run", "--runtime", runtime, "--rm", "--rootfs", str(rootfs), cid, "/bin/sleep", "60"
    )
    try:
        containerd.wait_task_status(cid, RUNNING, timeout=15)
        r = containerd.ctr("task", "kill", "-s", "SIGKILL", cid, timeout=10)
        assert r.returncode == 0, describe(r)
        try:
            out, err = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("foreground `ctr run` did not return after SIGKILL of its task")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
    assert p.returncode == 137, f"rc={p.returncode} stdout={out!r} stderr={err!r}"
    containerd.assert_no_leaks(cid)


def test_event_order(containerd: Containerd, runtime: str, rootfs: Path, cid: str) -> None:
    watcher = containerd.events()
    try:
        r = containerd.ctr(
            "run", "--runtime", runtime, "--rm", "--rootfs", str(rootfs), cid,
            "/bin/sh", "-c", "echo hello; sleep 0.2; exit 3",
            timeout=20,
        )  # fmt: skip
        assert r.returncode == 3, describe(r)
        watcher.wait_for(cid, "/tasks/delete")
        time.sleep(0.3)  # let stray (duplicate/late) task events show up
    finally:
        watcher.stop()
    evs = {e.topic: e for e in watcher.for_container(cid)}
    trace = "\n".join(e.raw for e in watcher.for_container(cid))
    assert watcher.topics(cid) == RUN_TOPICS, trace

    pid = evs["/tasks/create"].data.get("pid")
    assert pid, trace
    assert evs["/tasks/start"].data.get("pid") == pid, trace
    ex = evs["/tasks/exit"].data
    assert ex.get("id") == cid, f"TaskExit.id must be the container id for init\n{trace}"
    assert ex.get("pid") == pid, trace
    assert ex.get("exit_status", 0) == 3, trace
    dl = evs["/tasks/delete"].data
    assert dl.get("pid") == pid, trace
    assert dl.get("exit_status", 0) == 3, trace
    assert dl.get("exited_at") == ex.get("exited_at"), trace
    assert evs["/tasks/create"].data.get("bundle") == str(containerd.bundle_dir(cid)), trace
    containerd.assert_no_leaks(cid)


def test_exec_exit_code_and_events(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    pid = run_detached(containerd, runtime, rootfs, cid, "/bin/sleep", "60")
    watcher = containerd.events()
    try:
        r = containerd.ctr(
            "task", "exec", "--exec-id", "e1", cid,
            "/bin/sh", "-c", "echo from-exec; sleep 0.2; exit 5",
            timeout=20,
        )  # fmt: skip
        assert r.returncode == 5, describe(r)
        assert "from-exec" in r.stdout, describe(r)
        exit_ev = watcher.wait_for(cid, "/tasks/exit")
    finally:
        watcher.stop()
    trace = "\n".join(e.raw for e in watcher.for_container(cid))
    exec_topics = [
        e.topic
        for e in watcher.for_container(cid)
        if e.topic in ("/tasks/exec-added", "/tasks/exec-started", "/tasks/exit")
    ]
    assert exec_topics == ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"], trace
    assert exit_ev.data.get("id") == "e1", trace
    assert exit_ev.data.get("exit_status", 0) == 5, trace
    assert exit_ev.data.get("pid") not in (None, pid), trace
    # the init is untouched by the exec
    assert containerd.tasks()[cid] == (pid, RUNNING)
    assert kill_and_delete(containerd, cid) == 137
    containerd.assert_no_leaks(cid)


def test_shim_state(containerd: Containerd, runtime: str, rootfs: Path, cid: str) -> None:
    pid = run_detached(containerd, runtime, rootfs, cid, "/bin/sleep", "60")
    r = containerd.ctr("shim", "--id", cid, "state", timeout=10)
    assert r.returncode == 0, describe(r)
    state = json.loads(r.stdout)
    assert state.get("id") == cid, r.stdout
    assert state.get("pid") == pid, r.stdout
    assert state.get("status") == STATUS_NUMBERS[RUNNING], r.stdout
    assert state.get("bundle") == str(containerd.bundle_dir(cid)), r.stdout
    assert kill_and_delete(containerd, cid) == 137
    containerd.assert_no_leaks(cid)


def _raw_send(path: str, data: bytes, read_reply: bool) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(path)
        s.sendall(data)
        if not read_reply:
            return b""
        try:
            return s.recv(65536)
        except TimeoutError:
            return b""


def test_malformed_frames_do_not_kill_shim(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    pid = run_detached(containerd, runtime, rootfs, cid, "/bin/sleep", "60")
    address = containerd.shim_address(cid)
    assert address.startswith("unix:///run/containerd/s/"), address
    path = address[len("unix://") :]
    shims_before = {p.pid for p in containerd.shim_processes(cid)}

    rnd = random.Random(20240601)
    junk = bytes(rnd.getrandbits(8) for _ in range(48))
    # a Request frame (type 1) on stream 1 whose payload is not a valid Request
    reply = _raw_send(path, struct.pack(">IIBB", len(junk), 1, 1, 0) + junk, read_reply=True)
    if reply:  # answering is optional; if it answers it must be a Response on stream 1
        assert len(reply) >= 10, reply
        length, stream, mtype, _flags = struct.unpack(">IIBB", reply[:10])
        assert (stream, mtype) == (1, 2), f"bad reply frame {reply!r}"
        assert length <= 4 << 20
    frames = [
        struct.pack(">IIBB", 100, 3, 1, 0) + b"truncat",  # announces 100 bytes, sends 7
        b"\x00\x00\x00",  # not even a full header
        struct.pack(">IIBB", 4, 5, 0x7F, 0) + b"abcd",  # unknown message type
        struct.pack(">IIBB", 0xFFFFFFFF, 7, 1, 0) + junk,  # absurd length
        bytes(rnd.getrandbits(8) for _ in range(64)),  # pure noise
    ]
    for frame in frames:
        _raw_send(path, frame, read_reply=False)

    # the shim, the task and the shim's API are all still fine
    assert {p.pid for p in containerd.shim_processes(cid)} == shims_before
    assert containerd.tasks()[cid] == (pid, RUNNING)
    r = containerd.ctr("shim", "--id", cid, "state", timeout=10)
    assert r.returncode == 0, describe(r)
    assert json.loads(r.stdout).get("status") == STATUS_NUMBERS[RUNNING], r.stdout
    assert kill_and_delete(containerd, cid) == 137
    containerd.assert_no_leaks(cid)


def test_task_survives_containerd_restart(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str
) -> None:
    pid = run_trap_sh(containerd, runtime, rootfs, cid)
    shims = {p.pid for p in containerd.shim_processes(cid)}
    assert shims

    containerd.kill()  # SIGKILL: shims and containers must not notice
    assert pid_alive(pid), "container died with containerd"
    assert {p.pid for p in containerd.shim_processes(cid)} == shims
    containerd.start()

    assert containerd.tasks().get(cid) == (pid, RUNNING)
    assert {p.pid for p in containerd.shim_processes(cid)} == shims, "shim was replaced"
    r = containerd.ctr("task", "kill", cid, timeout=10)
    assert r.returncode == 0, describe(r)
    containerd.wait_task_status(cid, STOPPED, timeout=10)
    assert delete_task(containerd, cid) == 143
    containerd.assert_no_leaks(cid)
