"""The fork server through a real containerd and runc (pyshim only: the Go shim
has no such thing).

Each test runs its own private containerd whose environment points the shim at
a private fork-server directory, so the server it launches is ours to stop.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from shimv2 import forkserver

from .forkservers import Private
from .harness import RUNNING, STOPPED, Containerd, pid_alive, wait_until

pytestmark = pytest.mark.e2e

PYSHIM = "io.containerd.pyshim.v2"


@pytest.fixture
def private(e2e_tools: None) -> Iterator[Private]:
    p = Private()
    yield p
    p.close()


def run_detached(c: Containerd, rootfs: Path, cid: str) -> int:
    c.ctr("run", "-d", "--runtime", PYSHIM, "--rootfs", str(rootfs), cid, "/bin/sleep", "300")
    c.wait_task_status(cid, {RUNNING}, timeout=10)
    [shim] = c.shim_processes(cid)
    return shim.pid


def remove(c: Containerd, cid: str) -> None:
    c.ctr("task", "kill", "-s", "SIGKILL", cid)
    c.wait_task_status(cid, {STOPPED}, timeout=10)
    c.ctr("task", "rm", cid)
    c.ctr("container", "rm", cid)


def test_first_start_launches_the_server_later_ones_fork_from_it(
    private: Private, rootfs: Path
) -> None:
    c = private.c
    first = c.new_id()
    direct = run_detached(c, rootfs, first)  # no server yet: a fresh interpreter
    server = private.wait_for_server()
    second = c.new_id()
    forked = run_detached(c, rootfs, second)
    log = Path(forkserver.paths(str(private.fs_dir), forkserver.version_tag())[2]).read_text()
    assert "start runs in child" in log
    # A forked daemon (the server's child that ran `start`, then became it) shows
    # the same command line as a spawned one, in containerd's cgroups.
    # NUL-separated argv, exactly what the exec'd one has (pgrep -f, leak checks).
    cmd = _argv(forked)
    assert cmd[cmd.index("-id") + 1] == second
    assert cmd == [second if arg == first else arg for arg in _argv(direct)]
    assert cmd[cmd.index("-address") + 1] == str(c.address)
    assert psutil.Process(forked).cmdline() == cmd
    assert psutil.Process(forked).ppid() == server  # which reaps it
    assert os.getpgid(forked) == forked and os.getsid(forked) == forked
    assert _cgroups(forked) == _cgroups(c.pid or 0)
    for shim in (direct, forked):
        # fd 3, the listener, stays out of runc and hooks: close-on-exec
        assert _fd_flags(shim, 3) & os.O_CLOEXEC, f"shim {shim} would leak its listener"
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{shim}/fd"))[:4] == [0, 1, 2, 3]
    with open(f"/proc/{c.pid}/oom_score_adj") as f:
        containerd_score = int(f.read())
    with open(f"/proc/{forked}/oom_score_adj") as f:
        assert int(f.read()) == min(containerd_score + 1, 1000)
    # Both work the same: exec, then stop and delete.
    for cid in (first, second):
        out = c.ctr("task", "exec", "--exec-id", "e1", cid, "/bin/echo", "hi").stdout
        assert out.strip() == "hi"
        remove(c, cid)
    wait_until(lambda: not pid_alive(direct) and not pid_alive(forked), 10, what="shims gone")
    c.assert_no_leaks(first, second)


def test_shims_take_containerds_cgroup_not_the_servers(private: Private, rootfs: Path) -> None:
    """A server launched from another cgroup still puts each shim where containerd is."""
    if not Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
        pytest.skip("needs the cgroup v1 pids hierarchy (join_cgroups on v2: unit tests)")
    name = f"pyshim-fs-{uuid.uuid4().hex[:8]}"
    elsewhere = Path("/sys/fs/cgroup/pids") / name
    elsewhere.mkdir()
    try:
        tag = forkserver.version_tag()
        env = {**os.environ, forkserver.DIR_ENV: str(private.fs_dir), forkserver.ENABLE_ENV: "1"}
        binary = str(
            Path(c_bin := private.c.env["PATH"].split(":")[0]) / "containerd-shim-pyshim-v2"
        )
        assert os.path.exists(binary), c_bin
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: join the cgroup, then become the server
            try:
                (elsewhere / "cgroup.procs").write_text(str(os.getpid()))
                os.setsid()
                os.execve(binary, [binary, "forkserver", tag, "#" * forkserver.TITLE_ROOM], env)
            finally:
                os._exit(127)
        server = private.wait_for_server()
        assert server == pid
        assert _cgroups(server)["pids"] == f"/{name}"
        cid = private.c.new_id()
        shim = run_detached(private.c, rootfs, cid)
        assert _cgroups(shim) == _cgroups(private.c.pid or 0)
        remove(private.c, cid)
    finally:
        running = private.server_pid()
        if running is not None:
            os.kill(running, signal.SIGKILL)
            wait_until(lambda: not pid_alive(running), timeout=10, what="server gone")
        with_retries(lambda: elsewhere.rmdir())


def test_killing_the_server_breaks_nothing(private: Private, rootfs: Path) -> None:
    c = private.c
    warmup = c.new_id()
    run_detached(c, rootfs, warmup)
    server = private.wait_for_server()
    cid = c.new_id()
    shim = run_detached(c, rootfs, cid)  # forked from the server
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: not pid_alive(server), timeout=10, what="server gone")
    assert c.task_status(cid) == RUNNING and pid_alive(shim)
    assert c.ctr("task", "exec", "--exec-id", "e1", cid, "/bin/echo", "ok").stdout.strip() == "ok"
    later = c.new_id()  # no server: this start runs itself and launches a new server
    run_detached(c, rootfs, later)
    assert private.wait_for_server() != server
    for each in (warmup, cid, later):
        remove(c, each)
    c.assert_no_leaks(warmup, cid, later)


def test_disabled_fork_server_is_never_launched(e2e_tools: None, rootfs: Path) -> None:
    p = Private({forkserver.ENABLE_ENV: "0"})
    try:
        for _ in range(2):
            cid = p.c.new_id()
            out = p.c.ctr(
                "run", "--rm", "--runtime", PYSHIM, "--rootfs", str(rootfs), cid, "/bin/echo", "x"
            ).stdout
            assert out.strip() == "x"
        assert not p.fs_dir.exists()
    finally:
        p.close()


def _argv(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert raw.endswith(b"\0"), raw  # not a setproctitle-style single string
    return raw[:-1].decode().split("\0")


def _fd_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags for fd {fd} of {pid}")


def _cgroups(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            out[names or "unified"] = path
    return out


def with_retries(action: object, attempts: int = 50) -> None:
    for _ in range(attempts):
        try:
            action()  # type: ignore[operator]
            return
        except OSError:
            time.sleep(0.1)
