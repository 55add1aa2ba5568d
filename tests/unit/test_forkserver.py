"""The fork server (shimv2/forkserver.py) with a private server directory.

The shim binary is the launcher in the venv (what containerd runs); each test
starts its own server under tmp_path and stops it by pid.
"""

from __future__ import annotations

import json
import marshal
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from shimv2 import bundle as bundlefiles
from shimv2 import forkserver
from shimv2.api.containerd.task.v2 import shim_pb2

BINARY = str(Path(sys.executable).parent / "containerd-shim-pyshim-v2")


def _env(directory: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSHIM_")}
    env.update({forkserver.DIR_ENV: str(directory), forkserver.ENABLE_ENV: "1", **extra})
    return env


class Server:
    def __init__(self, directory: Path, idle: str = "600") -> None:
        self.dir = directory
        self.tag = forkserver.version_tag()
        self.sock, _, self.log, self.pidfile = (
            Path(p) for p in forkserver.paths(str(directory), self.tag)
        )
        self.proc = subprocess.Popen(
            [BINARY, "forkserver", self.tag, "#" * forkserver.TITLE_ROOM],
            env=_env(directory, **{forkserver.IDLE_ENV: idle}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            assert self.proc.poll() is None, f"fork server exited: {self.proc.returncode}"
            assert time.monotonic() < deadline, "fork server did not come up"
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """Short: unix socket paths end at 108 bytes, pytest's tmp_path is long."""
    directory = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
    yield directory / "d"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def server(server_dir: Path) -> Iterator[Server]:
    s = Server(server_dir)
    yield s
    s.stop()


def make_bundle(base: Path) -> Path:
    bundle = base / "t1"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["true"]}}))
    bundlefiles.write_exit(str(bundle), bundlefiles.ExitRecord(4321, 7, 1_700_000_000_000_000_001))
    return bundle


def run_delete(
    bundle: Path, env: dict[str, str], *prefix: str
) -> subprocess.CompletedProcess[bytes]:
    argv = [*prefix, BINARY, "-namespace", "unitns", "-id", "t1", "-bundle", str(bundle), "delete"]
    return subprocess.run(
        argv, cwd=bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )


def test_delete_runs_in_the_fork_server(server: Server, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    result = run_delete(bundle, _env(server.dir))
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    response = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert (response.pid, response.exit_status) == (0, 7)
    assert response.exited_at.ToNanoseconds() == 1_700_000_000_000_000_001
    assert "delete runs in child" in server.log_text()


def test_exit_status_and_stderr_come_back(server: Server, tmp_path: Path) -> None:
    """A failing start through the server fails exactly as a local one."""
    env = _env(server.dir)
    result = subprocess.run(
        [BINARY, "-id", "x", "-address", "/nowhere", "start"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr == b"shim namespace cannot be empty\n"
    assert "start runs in child" in server.log_text()


def test_other_namespaces_are_refused_and_the_command_runs_locally(
    server: Server, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path)
    result = run_delete(bundle, _env(server.dir), "unshare", "--mount", "--")
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7
    assert "other namespaces" in server.log_text()
    assert "delete runs in child" not in server.log_text()


def test_no_server_means_a_local_run(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    result = run_delete(bundle, _env(tmp_path / "nothing-here"))
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7
    assert not (tmp_path / "nothing-here").exists()  # delete never launches a server


def test_a_killed_server_is_not_needed(server: Server, tmp_path: Path) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    assert server.sock.exists()  # stale socket: connection refused
    bundle = make_bundle(tmp_path)
    result = run_delete(bundle, _env(server.dir))
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7


def test_directory_and_socket_are_root_only(server: Server) -> None:
    assert server.dir.stat().st_mode & 0o777 == 0o700
    assert server.sock.stat().st_mode & 0o777 == 0o600
    with open(f"/proc/{server.proc.pid}/cmdline", "rb") as f:
        cmdline = f.read()
    assert cmdline.rstrip(b"\0").endswith(f"forkserver {server.tag}".encode())
    assert psutil.Process(server.proc.pid).cmdline()[-2:] == ["forkserver", server.tag]


def test_a_peer_with_another_uid_is_refused(server: Server) -> None:
    server.dir.parent.chmod(0o711)  # let the other user reach the socket at all
    server.dir.chmod(0o711)
    server.sock.chmod(0o666)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conn.settimeout(10)
            conn.connect(str(server.sock))
            try:
                conn.send(b"anything")
                answer = conn.recv(100)
            except (BrokenPipeError, ConnectionResetError):
                answer = b""  # closed before or after the request: refused either way
            os.write(write_end, b"answer:" + answer)
        except OSError as exc:
            os.write(write_end, f"error:{exc}".encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as f:
        assert f.read() == b"answer:"  # closed without a word
    assert "refusing peer" in server.log_text()


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage", b"\xff" * 100],
)
def test_bad_requests_are_refused_and_the_server_keeps_serving(
    server: Server, tmp_path: Path, payload: bytes
) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(str(server.sock))
    conn.send(payload)
    assert conn.recv(200).startswith(b"refused ")
    conn.close()
    bundle = make_bundle(tmp_path)
    result = run_delete(bundle, _env(server.dir))
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7
    assert "delete runs in child" in server.log_text()


def test_idle_server_exits_and_cleans_up(server_dir: Path) -> None:
    s = Server(server_dir, idle="1")
    try:
        assert s.proc.wait(30) == 0
        assert not s.sock.exists() and not s.pidfile.exists()
    finally:
        s.stop()


def test_version_tag_follows_the_files(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    first = forkserver.version_tag(str(package))
    assert forkserver.version_tag(str(package)) == first
    os.utime(package / "a.py", ns=(1, 1))
    assert forkserver.version_tag(str(package)) != first
    assert forkserver.version_tag() != first


def test_disabled_by_environment() -> None:
    assert not forkserver.enabled({forkserver.ENABLE_ENV: "0"})
    assert not forkserver.enabled({forkserver.ENABLE_ENV: "off"})
    assert forkserver.enabled({})


def test_files_of_dead_servers_are_removed(server_dir: Path) -> None:
    server_dir.mkdir(mode=0o700)
    for ext in (".lock", ".sock", ".pid", ".log"):
        (server_dir / f"forkserver-dead{ext}").write_text("")
    s = Server(server_dir)
    try:
        assert sorted(p.name for p in server_dir.glob("forkserver-dead*")) == []
        assert s.sock.exists()
    finally:
        s.stop()


def test_sigterm_cleans_up(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert not server.sock.exists() and not server.pidfile.exists()


def _fake_server(directory: Path, answers: list[bytes]) -> tuple[socket.socket, threading.Thread]:
    """A socket at the real server's path that takes one request and answers
    ``answers``, then hangs up: a server dying at a chosen moment."""
    directory.mkdir(mode=0o700)
    path = forkserver.paths(str(directory), forkserver.version_tag())[0]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        _, fds, _, _ = socket.recv_fds(conn, forkserver.MAX_REQUEST, 8)
        for fd in fds:  # the caller's stdout among them: holding it would keep it open
            os.close(fd)
        for answer in answers:
            conn.send(answer)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_server_gone_before_forking_means_a_local_run(server_dir: Path, tmp_path: Path) -> None:
    listener, thread = _fake_server(server_dir, [])  # hangs up without a word
    try:
        result = run_delete(make_bundle(tmp_path), _env(server_dir))
    finally:
        thread.join(10)
        listener.close()
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7


def test_a_command_cut_short_is_not_run_twice(server_dir: Path, tmp_path: Path) -> None:
    listener, thread = _fake_server(server_dir, [b"ack"])  # forked, then died
    try:
        result = run_delete(make_bundle(tmp_path), _env(server_dir))
    finally:
        thread.join(10)
        listener.close()
    assert (result.returncode, result.stdout) == (1, b"")
    assert b"cut short" in result.stderr


def test_a_context_it_cannot_take_over_is_refused_after_the_ack(
    server: Server, tmp_path: Path
) -> None:
    """A cgroup the server cannot join (CgroupError) is a refusal, not "exit 1"."""
    request = {
        "protocol": forkserver.PROTOCOL,
        "argv": ["-namespace", "x", "-id", "t1", "delete"],
        "command": [BINARY],
        "env": {},
        "umask": 0o022,
        "rlimits": {},
        "cgroup": "99:bogus_controller:/nowhere\n",
    }
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(str(server.sock))
    cwd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        socket.send_fds(conn, [marshal.dumps(request)], [0, 1, 2, cwd])
        assert conn.recv(100) == b"ack"
        answer = conn.recv(1000)
    finally:
        os.close(cwd)
        conn.close()
    assert answer.startswith(b"refused cannot take over the caller's context"), answer
