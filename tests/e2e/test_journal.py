"""Events across a containerd outage, and a full bundle filesystem (issue 5, item 2).

* A container exits while containerd is dead (SIGKILL): its ``/tasks/exit``
  waits, and after containerd's restart it arrives exactly once. Runs for both
  runtimes (the Go shim also manages it, as long as the outage is shorter than
  its ~15 s retry window). pyshim only, because only pyshim has it: the exit is
  in the on-disk journal (``<bundle>/events.journal``) during the outage, marked
  delivered afterwards, and the journal is removed by the task's deletion.
* The bundle's filesystem is full (containerd's ``--state`` on a small tmpfs,
  filled up after the container started): State, Kill, Wait and Delete still
  work and the exit status is right, for both runtimes. pyshim only: it says in
  containerd's log what it could not persist (``init.exit.json``); the Go shim
  writes nothing into the bundle after Create, so it has nothing to report.

How deliveries are counted: containerd at debug level logs every ``Forward``
it accepts (``msg="event forwarded" ns=<ns> topic=<topic>``). A ``ctr events``
subscriber dies with containerd and cannot be back before the shim's next retry
(at most 2 s), so it cannot see the redelivery; the log can.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimv2.api.containerd.events import task_pb2 as events
from shimv2.api.containerd.services.events.ttrpc.v1 import events_pb2
from shimv2.journal import read

from .harness import (
    RUNNING,
    RUNTIMES,
    STOPPED,
    Containerd,
    HarnessError,
    go_shim_limitation,
    mounts_under,
    pid_alive,
    unmount_all_under,
    wait_until,
)

pytestmark = pytest.mark.e2e

PYSHIM = RUNTIMES["pyshim"]
#: containerd >= 1.7 deletes a reloaded shim whose Pids is empty (PR #6866); the Go
#: shim's stopped task has none, so it and its exit are gone after the restart.
LOST_ON_RELOAD = "a task stopped during the outage is deleted on reload (empty Pids)"


def describe(r: subprocess.CompletedProcess[str]) -> str:
    return f"rc={r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"


def run_until_marker(c: Containerd, runtime: str, rootfs: Path, cid: str, code: int) -> Path:
    """A container that exits with ``code`` once the returned marker file exists."""
    script = f"while [ ! -e /tmp/{cid}.go ]; do sleep 0.05; done; exit {code}"
    r = c.ctr(
        "run", "--runtime", runtime, "-d", "--rootfs", str(rootfs), cid, "/bin/sh", "-c", script,
        timeout=20,
    )  # fmt: skip
    assert r.returncode == 0, describe(r)
    c.wait_task_status(cid, RUNNING, timeout=10)
    return rootfs / "tmp" / f"{cid}.go"


def forwarded(c: Containerd, offset: int, topic: str) -> int:
    """How many ``topic`` events of our namespace containerd accepted since ``offset``."""
    pattern = re.compile(
        rf'msg="event forwarded" ns={re.escape(c.namespace)} topic={re.escape(topic)}(\s|$)'
    )
    lines = c.log_since(offset, max_lines=100_000).splitlines()
    return sum(1 for line in lines if pattern.search(line))


def undelivered(journal: Path) -> list[tuple[str, events_pb2.Envelope]]:
    delivered, records = read(str(journal))
    out = []
    for record in records:
        if record.seq > delivered:
            envelope = events_pb2.Envelope.FromString(record.payload)
            out.append((envelope.topic, envelope))
    return out


def delete_task(c: Containerd, cid: str) -> int:
    r = c.ctr("task", "rm", cid, timeout=15)
    assert r.returncode == 0, describe(r)
    m = re.search(r"exit with non-zero exit code (\d+)", r.stderr)
    r2 = c.ctr("container", "rm", cid, timeout=15)
    assert r2.returncode == 0, describe(r2)
    return int(m.group(1)) if m else 0


# --------------------------------------------------------------------------- outage


def test_exit_during_containerd_outage_arrives_once(
    containerd: Containerd, runtime: str, rootfs: Path, cid: str, request: pytest.FixtureRequest
) -> None:
    go_shim_limitation(request, containerd, runtime, (1, 7), LOST_ON_RELOAD)
    marker = run_until_marker(containerd, runtime, rootfs, cid, 7)
    pid = containerd.task_pid(cid)
    journal = containerd.bundle_dir(cid) / "events.journal"
    if runtime == PYSHIM:
        # create and start were delivered: the journal exists and holds nothing pending
        wait_until(lambda: journal.exists() and not undelivered(journal), 10, what="delivered")

    containerd.kill()  # SIGKILL
    marker.touch()  # the container exits while nobody listens
    assert pid is not None
    wait_until(lambda: not pid_alive(pid), 10, what="container exit")
    if runtime == PYSHIM:
        # The exit waits on disk, in the bundle.
        pending = wait_until(lambda: undelivered(journal), 10, what="exit in the journal")
        assert [topic for topic, _ in pending] == ["/tasks/exit"]
        exit_ = events.TaskExit.FromString(pending[0][1].event.value)
        assert (exit_.container_id, exit_.id, exit_.pid, exit_.exit_status) == (cid, cid, pid, 7)
        time.sleep(1.0)  # a few failed attempts: still there, still once
        assert [topic for topic, _ in undelivered(journal)] == ["/tasks/exit"]

    offset = containerd.log_size()
    containerd.start()
    # The Go shim retries at +1, +3, +6, +10 s after the exit; pyshim every 2 s at most.
    wait_until(
        lambda: forwarded(containerd, offset, "/tasks/exit") >= 1, 15, what="/tasks/exit forwarded"
    )
    if runtime == PYSHIM:
        wait_until(lambda: not undelivered(journal), 5, what="journal marked delivered")
        assert journal.exists()  # kept until the task is deleted
    watcher = containerd.events()
    try:
        time.sleep(2.5)  # longer than pyshim's longest retry delay: a duplicate would be here
        assert forwarded(containerd, offset, "/tasks/exit") == 1, containerd.log_since(offset)
        assert containerd.task_status(cid) == STOPPED
        assert delete_task(containerd, cid) == 7
        watcher.wait_for(cid, "/tasks/delete")
        time.sleep(0.3)
    finally:
        watcher.stop()
    assert watcher.topics(cid) == ["/tasks/delete"], "\n".join(watcher.lines)
    if runtime == PYSHIM:
        log = containerd.log_since(offset, max_lines=100_000)
        assert f"every event of {cid} delivered: removed its journal" in log
    containerd.assert_no_leaks(cid)


# --------------------------------------------------------------------------- full disk

TMPFS_SIZE = "4m"


@pytest.fixture(scope="module")
def small_state_containerd(e2e_tools: None) -> Iterator[Containerd]:
    """A private containerd whose --state (every bundle) is a small tmpfs of its own."""
    c = Containerd()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0711", "pyshim-e2e", str(c.state)],
        check=True,
        capture_output=True,
        timeout=10,
    )
    try:
        try:
            c.start()
        except HarnessError as e:
            pytest.fail(f"could not start a private containerd: {e}", pytrace=False)
        yield c
    finally:
        c.stop(remove=False)
        unmount_all_under(c.state)  # stop() detaches it too; make sure
        assert not mounts_under(c.state), f"tmpfs still mounted at {c.state}"
        if not os.environ.get("PYSHIM_E2E_KEEP"):
            shutil.rmtree(c.dir, ignore_errors=True)


@contextlib.contextmanager
def filled(directory: Path) -> Iterator[None]:
    """Fill the filesystem of ``directory`` to the last byte; free it afterwards."""
    path = directory / "fill"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = b"\0" * (1 << 16)
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
        os.close(fd)
        fd = -1
        probe = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left"):
                os.write(probe, b"x" * 4096)
        finally:
            os.close(probe)
            os.unlink(directory / "probe")
        yield
    finally:
        if fd >= 0:
            os.close(fd)
        path.unlink()


def test_full_bundle_filesystem_keeps_the_shim_serving(
    small_state_containerd: Containerd, runtime: str, rootfs: Path
) -> None:
    c = small_state_containerd
    c.test_log_offset = offset = c.log_size()
    cid = c.new_id("full")
    marker = run_until_marker(c, runtime, rootfs, cid, 5)
    pid = c.task_pid(cid)
    watcher = c.events()
    try:
        with filled(c.state):
            assert c.tasks()[cid] == (pid, RUNNING)  # State
            r = c.ctr("shim", "--id", cid, "state", timeout=10)
            assert r.returncode == 0, describe(r)
            marker.touch()  # the init exits: pyshim cannot write init.exit.json
            c.wait_task_status(cid, STOPPED, timeout=10)
            exit_ = watcher.wait_for(cid, "/tasks/exit")
            assert exit_.data.get("exit_status") == 5, exit_.raw
            assert delete_task(c, cid) == 5  # Delete
            watcher.wait_for(cid, "/tasks/delete")
        assert watcher.topics(cid) == ["/tasks/exit", "/tasks/delete"]
    finally:
        watcher.stop()
    if runtime == PYSHIM:
        log = c.log_since(offset, max_lines=100_000)
        expected = (
            f"could not persist the exit of {cid} in init.exit.json: No space left on device;"
            " kept in memory"
        )
        assert expected in log, log
    c.assert_no_leaks(cid)


def test_kill_on_a_full_bundle_filesystem(
    small_state_containerd: Containerd, runtime: str, rootfs: Path
) -> None:
    c = small_state_containerd
    c.test_log_offset = c.log_size()
    cid = c.new_id("full")
    r = c.ctr(
        "run", "--runtime", runtime, "-d", "--rootfs", str(rootfs), cid, "/bin/sleep", "60",
        timeout=20,
    )  # fmt: skip
    assert r.returncode == 0, describe(r)
    c.wait_task_status(cid, RUNNING, timeout=10)
    with filled(c.state):
        r = c.ctr("task", "kill", "-s", "SIGKILL", cid, timeout=10)
        assert r.returncode == 0, describe(r)
        c.wait_task_status(cid, STOPPED, timeout=10)
        assert delete_task(c, cid) == 137
    c.assert_no_leaks(cid)
