"""The binary contract: socket naming, ``start`` and ``delete`` (spec: shim-contract.md §4, §6).

In-process tests redirect ``manager.SOCKET_DIR`` to a temporary directory and
replace the daemon spawn. A module constant cannot be redirected in a
subprocess, so the real ``start`` subprocess tests use the real
``/run/containerd/s`` with a unique ``-address``/``-namespace`` pair (hence a
unique socket name), and shut every daemon down (or SIGKILL it) afterwards,
removing its socket.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio
from fakes import install_fake_runc, is_gone, read_records, wait_gone

from shimv2 import bundle as bundlefiles
from shimv2 import manager
from shimv2.api.containerd.task.v2 import shim_pb2
from shimv2.flags import Flags
from shimv2.options import ShimOptions
from shimv2.ttrpc import Code, TTRPCError, connect

SHIM = Path(sys.executable).parent / "containerd-shim-pyshim-v2"
REAL_SOCKET_DIR = "/run/containerd/s"


# -- socket naming ------------------------------------------------------------


def test_socket_path_matches_observed_containerd_value() -> None:
    assert hashlib.sha256(b"/tmp/pyspec/c.sock/pyspec/t1").hexdigest() == (
        "18f5214f3ef15e6bf49795f6c52a95c6817b58aa9571c133b067d83156b7a6d7"
    )
    assert manager.socket_path("/tmp/pyspec/c.sock", "pyspec", "t1") == (
        "/run/containerd/s/18f5214f3ef15e6bf49795f6c52a95c6817b58aa9571c133b067d83156b7a6d7"
    )


@pytest.mark.parametrize(
    "address", ["/tmp/pyspec//c.sock", "/tmp/pyspec/./c.sock/", "/tmp/x/../pyspec/c.sock"]
)
def test_socket_path_cleans_the_joined_path_like_go(address: str) -> None:
    assert manager.socket_path(address, "pyspec", "t1") == manager.socket_path(
        "/tmp/pyspec/c.sock", "pyspec", "t1"
    )


def test_socket_path_differs_per_namespace_and_group() -> None:
    paths = {
        manager.socket_path("/a", "ns1", "g"),
        manager.socket_path("/a", "ns2", "g"),
        manager.socket_path("/a", "ns1", "h"),
        manager.socket_path("/b", "ns1", "g"),
    }
    assert len(paths) == 4
    assert all(len(os.path.basename(p)) == 64 for p in paths)


def test_socket_path_follows_socket_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager, "SOCKET_DIR", "/elsewhere")
    assert manager.socket_path("/a", "ns", "g").startswith("/elsewhere/")


def write_config(bundle: Path, annotations: dict[str, str] | None = None) -> None:
    bundle.mkdir(parents=True, exist_ok=True)
    spec: dict[str, object] = {"ociVersion": "1.0.2"}
    if annotations is not None:
        spec["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(spec))


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        (None, "c1"),
        ({}, "c1"),
        ({"unrelated": "x"}, "c1"),
        ({"io.kubernetes.cri.sandbox-id": "sb"}, "sb"),
        ({"io.containerd.runc.v2.group": "rg"}, "rg"),
        ({"io.containerd.pyshim.v2.group": "pg"}, "pg"),
        (
            {
                "io.kubernetes.cri.sandbox-id": "sb",
                "io.containerd.runc.v2.group": "rg",
                "io.containerd.pyshim.v2.group": "pg",
            },
            "pg",
        ),
        ({"io.kubernetes.cri.sandbox-id": "sb", "io.containerd.runc.v2.group": "rg"}, "rg"),
        ({"io.containerd.pyshim.v2.group": "", "io.kubernetes.cri.sandbox-id": "sb"}, "sb"),
    ],
)
def test_group_id_annotation_order(
    tmp_path: Path, annotations: dict[str, str] | None, expected: str
) -> None:
    write_config(tmp_path, annotations)
    assert manager.group_id(str(tmp_path), "c1") == expected


def test_group_id_without_usable_config(tmp_path: Path) -> None:
    assert manager.group_id(str(tmp_path), "c1") == "c1"  # no config.json
    (tmp_path / "config.json").write_text("{not json")
    assert manager.group_id(str(tmp_path), "c1") == "c1"
    (tmp_path / "config.json").write_text('{"annotations": null}')
    assert manager.group_id(str(tmp_path), "c1") == "c1"


# -- bind_socket ----------------------------------------------------------------


@pytest.fixture
def sock_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short temporary SOCKET_DIR (unix socket paths are limited to 107 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="pyshim-u", dir="/tmp"))
    monkeypatch.setattr(manager, "SOCKET_DIR", str(base / "s"))
    try:
        yield base / "s"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def listening_at(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def test_bind_socket_listens_with_mode_0600(sock_dir: Path) -> None:
    path = sock_dir / "a"
    sock = manager.bind_socket(str(path))
    assert sock is not None
    try:
        assert sock_dir.is_dir()
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # listening already: connections queue in the backlog
    finally:
        sock.close()


def test_bind_socket_backlog_takes_a_burst_of_connects(sock_dir: Path) -> None:
    """200 clients connecting at once all get in, none accepted yet (Go: 4096)."""
    sock = manager.bind_socket(str(sock_dir / "a"))
    assert sock is not None
    clients: list[socket.socket] = []
    try:
        for _ in range(300):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            clients.append(client)
            client.connect(str(sock_dir / "a"))  # EAGAIN once the backlog is full
    finally:
        for client in clients:
            client.close()
        sock.close()


def test_bind_socket_replaces_a_stale_socket(sock_dir: Path) -> None:
    sock_dir.mkdir()
    path = sock_dir / "a"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: a shim that died
    assert path.exists()
    sock = manager.bind_socket(str(path))
    assert sock is not None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
        conn, _ = sock.accept()
        conn.close()
    finally:
        sock.close()


def test_bind_socket_returns_none_when_a_live_shim_serves_it(sock_dir: Path) -> None:
    sock_dir.mkdir()
    path = sock_dir / "a"
    live = listening_at(path)
    try:
        assert manager.bind_socket(str(path)) is None
        # The live shim's socket is untouched.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
    finally:
        live.close()


def test_bind_socket_other_errors_propagate(sock_dir: Path) -> None:
    with pytest.raises(OSError) as info:
        manager.bind_socket(str(sock_dir / "no-such-dir" / "a"))
    assert info.value.errno == errno.ENOENT


# -- start, in-process ----------------------------------------------------------


class FakeSpawn:
    def __init__(self, pid: int = 424242, error: Exception | None = None) -> None:
        self.pid = pid
        self.error = error
        self.calls: list[tuple[Flags, bool]] = []

    def __call__(self, flags: Flags, listener: socket.socket) -> int:
        # The listener handed to the daemon must already be listening.
        self.calls.append(
            (flags, listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
        )
        if self.error is not None:
            raise self.error
        return self.pid


@pytest.fixture
def in_process_start(
    sock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeSpawn, Path]:
    bundle = tmp_path / "bundle"
    write_config(bundle)
    monkeypatch.chdir(bundle)
    spawn = FakeSpawn()
    monkeypatch.setattr(manager, "_spawn_daemon", spawn)
    monkeypatch.setattr(manager, "_adjust_oom_score", lambda pid: None)
    stdin = io.TextIOWrapper(io.BytesIO(b"\x0a\x1acontainerd.runc.v1.Options"))
    monkeypatch.setattr(sys, "stdin", stdin)
    return spawn, bundle


def start_flags(**kw: str) -> Flags:
    values = {"namespace": "ns", "id": "c1", "address": "/run/containerd/containerd.sock"}
    values.update(kw)
    return Flags(**values, action="start")  # type: ignore[arg-type]


def test_start_in_process(
    in_process_start: tuple[FakeSpawn, Path], sock_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    spawn, bundle = in_process_start
    assert manager.start(start_flags()) == 0
    out, err = capfd.readouterr()
    expected = str(sock_dir / hashlib.sha256(b"/run/containerd/containerd.sock/ns/c1").hexdigest())
    assert out == "unix://" + expected
    assert err == ""
    assert (bundle / "address").read_text() == "unix://" + expected
    assert (bundle / "shim.pid").read_text() == "424242"
    assert [(f.namespace, f.id, listening) for f, listening in spawn.calls] == [("ns", "c1", True)]
    assert stat.S_ISSOCK(os.stat(expected).st_mode)


def test_start_in_process_uses_the_group_for_the_socket(
    in_process_start: tuple[FakeSpawn, Path], sock_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    _, bundle = in_process_start
    write_config(bundle, {"io.kubernetes.cri.sandbox-id": "sandbox1"})
    assert manager.start(start_flags()) == 0
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/ns/sandbox1").hexdigest()
    assert capfd.readouterr().out == f"unix://{sock_dir}/{digest}"


def test_start_in_process_joins_a_live_shim(
    in_process_start: tuple[FakeSpawn, Path], sock_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    spawn, bundle = in_process_start
    sock_dir.mkdir()
    path = manager.socket_path("/run/containerd/containerd.sock", "ns", "c1")
    live = listening_at(Path(path))
    try:
        assert manager.start(start_flags()) == 0
    finally:
        live.close()
    assert capfd.readouterr() == ("unix://" + path, "")
    assert spawn.calls == []
    assert (bundle / "address").read_text() == "unix://" + path
    assert not (bundle / "shim.pid").exists()


def test_start_in_process_spawn_failure(
    in_process_start: tuple[FakeSpawn, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    spawn, bundle = in_process_start
    spawn.error = OSError(errno.ENOMEM, "Cannot allocate memory")
    assert manager.start(start_flags()) == 1
    out, err = capfd.readouterr()
    assert out == ""
    assert err.startswith("failed to start shim: ")
    assert "Cannot allocate memory" in err
    path = manager.socket_path("/run/containerd/containerd.sock", "ns", "c1")
    assert not os.path.exists(path)  # the socket is not left behind
    assert not (bundle / "address").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (Flags(id="c1", action="start"), "shim namespace cannot be empty\n"),
        (Flags(namespace="ns", action="start"), "shim id cannot be empty\n"),
    ],
)
def test_start_in_process_requires_namespace_and_id(
    in_process_start: tuple[FakeSpawn, Path],
    capfd: pytest.CaptureFixture[str],
    flags: Flags,
    message: str,
) -> None:
    spawn, bundle = in_process_start
    assert manager.start(flags) == 1
    assert capfd.readouterr() == ("", message)
    assert spawn.calls == []
    assert not (bundle / "address").exists()


def test_adjust_oom_score_is_containerds_plus_one() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        with open(f"/proc/{os.getppid()}/oom_score_adj") as f:
            parent = int(f.read())
        manager._adjust_oom_score(child.pid)
        with open(f"/proc/{child.pid}/oom_score_adj") as f:
            assert int(f.read()) == min(parent + 1, 1000)
    finally:
        child.kill()
        child.wait()


def test_adjust_oom_score_ignores_a_missing_process() -> None:
    manager._adjust_oom_score(2**22 + 12345)  # above pid_max: never exists


# -- start and the daemon, as real processes -------------------------------------


class RealShim:
    """Bundles, daemons and sockets of the real `start` tests, cleaned up afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.namespace = "unit-" + uuid.uuid4().hex[:12]
        self.address = f"/tmp/{uuid.uuid4().hex}/c.sock"  # only hashed, never created
        self.daemons: list[int] = []
        self.sockets: list[str] = []
        self.log_fds: list[int] = []

    def bundle(self, name: str, config: dict[str, object] | None = None) -> Path:
        bundle = self.base / name
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config or {}))
        os.mkfifo(bundle / "log", 0o700)
        # containerd's reader, opened before `start` like containerd does.
        self.log_fds.append(os.open(bundle / "log", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        return bundle

    def argv(
        self, cid: str = "t1", action: str = "start", namespace: str | None = None
    ) -> list[str]:
        argv = [str(SHIM)]
        if namespace is None:
            namespace = self.namespace
        if namespace:
            argv += ["-namespace", namespace]
        argv += ["-address", self.address, "-publish-binary", "/usr/bin/containerd"]
        return [*argv, "-id", cid, action]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TTRPC_ADDRESS", "NOTIFY_SOCKET")}
        env["GOMAXPROCS"] = "2"
        return env

    def expected_path(self, group: str = "t1") -> str:
        joined = os.path.normpath(os.path.join(self.address, self.namespace, group))
        return f"{REAL_SOCKET_DIR}/{hashlib.sha256(joined.encode()).hexdigest()}"

    def start(
        self, bundle: Path, *, combined: bool = False, **kw: str
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            self.argv(**kw),
            cwd=bundle,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if combined else subprocess.PIPE,
            timeout=20,
        )
        self.sockets.append(self.expected_path())
        pid = bundlefiles.read_pid(str(bundle / "shim.pid"))
        if pid > 0:
            self.daemons.append(pid)
        return result

    def daemons_of_namespace(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            cmdline = proc.info["cmdline"] or []
            if self.namespace in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        return found

    def cleanup(self) -> None:
        for pid in self.daemons:
            if not is_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5)
        for path in self.sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for fd in self.log_fds:
            os.close(fd)


@pytest.fixture
def real_shim(tmp_path: Path) -> Iterator[RealShim]:
    shim = RealShim(tmp_path)
    try:
        yield shim
    finally:
        shim.cleanup()


async def connect_and_shutdown(address: str, cid: str) -> None:
    """Probe a fresh (empty) daemon on both service names; then Connect, which an
    empty shim answers NOT_FOUND (containerd reloading a shim that never got its
    Create) before it stops by itself."""
    async with connect(address) as client:
        with trio.fail_after(10):
            for service in ("containerd.task.v3.Task", "containerd.task.v2.Task"):
                with pytest.raises(TTRPCError) as state:
                    await client.call(
                        service, "State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse
                    )
                assert state.value.code == Code.NOT_FOUND
            with pytest.raises(TTRPCError) as connected:
                await client.call(
                    "containerd.task.v2.Task",
                    "Connect",
                    shim_pb2.ConnectRequest(id=cid),
                    shim_pb2.ConnectResponse,
                )
            assert connected.value.code == Code.NOT_FOUND


def wait_removed(path: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not os.path.exists(path)


def read_log(fd: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def test_real_start_daemon_connect_shutdown(real_shim: RealShim) -> None:
    bundle = real_shim.bundle("b1")
    result = real_shim.start(bundle)
    expected = real_shim.expected_path()
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout == f"unix://{expected}".encode()  # nothing else, no newline
    assert (bundle / "address").read_bytes() == f"unix://{expected}".encode()
    pid = bundlefiles.read_pid(str(bundle / "shim.pid"))
    assert pid > 0 and not is_gone(pid)
    st = os.stat(expected)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    daemon = psutil.Process(pid)
    assert daemon.cwd() == str(bundle)
    assert os.getpgid(pid) == pid  # its own process group, like Go's Setpgid

    trio.run(connect_and_shutdown, f"unix://{expected}", "t1")
    assert wait_gone(pid), "the empty daemon did not exit after Connect"
    assert wait_removed(expected), "the daemon left its socket behind"
    assert 'msg="serving' in read_log(real_shim.log_fds[0])


def test_real_start_combined_output_pipe_reaches_eof(real_shim: RealShim) -> None:
    # containerd: CombinedOutput(), one pipe for stdout and stderr, read to EOF.
    # If the daemon inherited that pipe this would hang until the timeout.
    bundle = real_shim.bundle("b1")
    began = time.monotonic()
    result = real_shim.start(bundle, combined=True)
    assert time.monotonic() - began < 10
    assert result.returncode == 0
    assert result.stdout == f"unix://{real_shim.expected_path()}".encode()
    pid = bundlefiles.read_pid(str(bundle / "shim.pid"))
    assert not is_gone(pid)
    fds = {os.readlink(f"/proc/{pid}/fd/{n}") for n in ("0", "1", "2")}
    assert not any(link.startswith("pipe:") for link in fds), fds
    trio.run(connect_and_shutdown, f"unix://{real_shim.expected_path()}", "t1")
    assert wait_gone(pid)


def test_real_start_twice_reuses_the_live_daemon(real_shim: RealShim) -> None:
    first = real_shim.bundle("b1")
    second = real_shim.bundle("b2")
    r1 = real_shim.start(first)
    assert r1.returncode == 0
    pid = bundlefiles.read_pid(str(first / "shim.pid"))
    r2 = real_shim.start(second)
    assert (r2.returncode, r2.stderr) == (0, b"")
    assert r2.stdout == r1.stdout
    assert (second / "address").read_bytes() == r1.stdout
    assert not (second / "shim.pid").exists()
    assert [p.pid for p in real_shim.daemons_of_namespace()] == [pid]
    trio.run(connect_and_shutdown, r1.stdout.decode(), "t1")
    assert wait_gone(pid)


def test_real_start_without_namespace_exits_1(real_shim: RealShim) -> None:
    bundle = real_shim.bundle("b1")
    result = subprocess.run(
        real_shim.argv(namespace=""),
        cwd=bundle,
        env=real_shim.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 1
    assert result.stdout == b""
    assert b"shim namespace cannot be empty" in result.stderr
    assert not (bundle / "address").exists()
    assert real_shim.daemons_of_namespace() == []


# -- delete ---------------------------------------------------------------------


@pytest.fixture
def fake_runc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake runc first on PATH; its invocations are recorded in the returned file."""
    install_fake_runc(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    record = tmp_path / "runc-record.jsonl"
    monkeypatch.setenv("FAKE_RUNC_RECORD", str(record))
    for var in ("FAKE_RUNC_FAIL", "FAKE_RUNC_RECORD_ONLY", "FAKE_RUNC_NOLOG"):
        monkeypatch.delenv(var, raising=False)
    return record


def run_delete(
    bundle: Path, cwd: Path | None = None, namespace: str = "unitns"
) -> subprocess.CompletedProcess:
    argv = [
        str(SHIM),
        "-namespace",
        namespace,
        "-address",
        "/run/containerd/containerd.sock",
        "-publish-binary",
        "/usr/bin/containerd",
        "-id",
        "t1",
        "-bundle",
        str(bundle),
        "-debug",
        "delete",
    ]
    return subprocess.run(
        argv,
        cwd=cwd or bundle,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )


def make_bundle(base: Path, root: Path | None = None, runc_state: bool = True) -> Path:
    """A bundle for container t1 in namespace unitns; with ``root``, runc keeps
    state for it there unless ``runc_state`` is False (delete skips runc then)."""
    bundle = base / "t1"
    bundle.mkdir()
    (bundle / "rootfs").mkdir()
    write_config(bundle)
    if root is not None:
        bundlefiles.write_runc_options(str(bundle), ShimOptions(root=str(root)))
        if runc_state:
            (root / "unitns" / "t1").mkdir(parents=True, exist_ok=True)
    return bundle


def test_delete_reports_the_recorded_exit(tmp_path: Path, fake_runc_env: Path) -> None:
    root = tmp_path / "runc-root"
    bundle = make_bundle(tmp_path, root)
    (bundle / "init.pid").write_text("4321")
    exited_at = 1_795_311_827_075_962_349
    bundlefiles.write_exit(str(bundle), bundlefiles.ExitRecord(4321, 3, exited_at))
    result = run_delete(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""  # "does not exist" from runc is not a warning
    response = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert (response.pid, response.exit_status) == (4321, 3)
    assert response.exited_at.ToNanoseconds() == exited_at
    assert response.SerializeToString() == result.stdout  # nothing but the message
    [entry] = read_records(fake_runc_env)
    assert entry["argv"] == [
        "--root",
        f"{root}/unitns",
        "--log",
        f"{bundle}/log.json",
        "--log-format",
        "json",
        "delete",
        "--force",
        "t1",
    ]


def test_delete_without_exit_record_reports_sigkill(tmp_path: Path, fake_runc_env: Path) -> None:
    bundle = make_bundle(tmp_path, tmp_path / "runc-root")
    (bundle / "init.pid").write_text("777")
    before = time.time_ns()
    result = run_delete(bundle)
    after = time.time_ns()
    assert result.returncode == 0
    response = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert (response.pid, response.exit_status) == (777, 137)
    assert before <= response.exited_at.ToNanoseconds() <= after


def test_delete_uses_default_runc_root_without_options(tmp_path: Path, fake_runc_env: Path) -> None:
    bundle = make_bundle(tmp_path)
    namespace = "unit-" + uuid.uuid4().hex[:8]
    state = Path(f"/run/containerd/runc/{namespace}/t1")
    state.mkdir(parents=True)
    try:
        result = run_delete(bundle, namespace=namespace)
    finally:
        shutil.rmtree(state.parent)
    assert result.returncode == 0
    [entry] = read_records(fake_runc_env)
    assert entry["argv"][:2] == ["--root", f"/run/containerd/runc/{namespace}"]


def test_delete_skips_runc_without_runc_state(tmp_path: Path, fake_runc_env: Path) -> None:
    """The usual case after a clean exit: nothing for runc to do, so it is not run."""
    bundle = make_bundle(tmp_path, tmp_path / "runc-root", runc_state=False)
    result = run_delete(bundle)
    assert result.returncode == 0, result.stderr
    assert read_records(fake_runc_env) == []


def test_delete_response_matches_protobuf() -> None:
    for pid, status, at in [(0, 0, 0), (12, 137, 1_763_790_000_123_456_789), (5, 0, 10**9)]:
        expected = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
        expected.exited_at.FromNanoseconds(at)
        assert manager.delete_response(pid, status, at) == expected.SerializeToString()


def test_delete_force_deletes_a_live_container(tmp_path: Path, fake_runc_env: Path) -> None:
    runc = install_fake_runc(tmp_path / "bin")
    root = tmp_path / "runc-root"
    bundle = make_bundle(tmp_path, root, runc_state=False)  # the fake runc creates it
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["sleep", "60"]}}))
    created = subprocess.run(
        [
            str(runc),
            "--root",
            f"{root}/unitns",
            "create",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(bundle / "init.pid"),
            "t1",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    assert created.returncode == 0
    pid = bundlefiles.read_pid(str(bundle / "init.pid"))
    try:
        assert not is_gone(pid)
        result = run_delete(bundle)
        assert result.returncode == 0, result.stderr
        assert shim_pb2.DeleteResponse.FromString(result.stdout).pid == pid
        assert wait_gone(pid), "runc delete --force did not kill the container"
        assert not (root / "unitns" / "t1").exists()
    finally:
        if not is_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_delete_reports_other_runc_errors_as_warnings(
    tmp_path: Path, fake_runc_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_bundle(tmp_path, tmp_path / "runc-root")
    monkeypatch.setenv("FAKE_RUNC_FAIL", "delete")
    monkeypatch.setenv("FAKE_RUNC_FAIL_MSG", "permission denied somewhere")
    result = run_delete(bundle)
    assert result.returncode == 0
    assert b"runc delete --force t1: permission denied somewhere" in result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 137


def test_delete_twice_concurrently(tmp_path: Path, fake_runc_env: Path) -> None:
    bundle = make_bundle(tmp_path, tmp_path / "runc-root")
    (bundle / "init.pid").write_text("55")
    bundlefiles.write_exit(str(bundle), bundlefiles.ExitRecord(55, 0, 1_000_000_000))
    procs = [
        subprocess.Popen(
            [
                str(SHIM),
                "-namespace",
                "unitns",
                "-address",
                "/a",
                "-id",
                "t1",
                "-bundle",
                str(bundle),
                "delete",
            ],
            cwd=bundle,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        response = shim_pb2.DeleteResponse.FromString(out)
        assert (response.pid, response.exit_status) == (55, 0)
        assert response.exited_at.ToNanoseconds() == 1_000_000_000


def test_delete_with_missing_bundle(tmp_path: Path, fake_runc_env: Path) -> None:
    result = run_delete(tmp_path / "gone", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    response = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert (response.pid, response.exit_status) == (0, 137)
    assert response.HasField("exited_at")


def test_delete_without_runc_binary_still_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_bundle(tmp_path)
    bundlefiles.write_runc_options(
        str(bundle),
        ShimOptions(binary_name=str(tmp_path / "no-runc"), root=str(tmp_path)),
    )
    (tmp_path / "unitns" / "t1").mkdir(parents=True)  # runc state left: runc is needed
    result = run_delete(bundle)
    assert result.returncode == 0
    assert b"runc delete --force t1" in result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 137


def test_delete_with_non_object_options_json(tmp_path: Path, fake_runc_env: Path) -> None:
    bundle = make_bundle(tmp_path)
    (bundle / "options.json").write_text("null")
    result = run_delete(bundle)
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 137


def test_delete_in_process_removes_a_dead_socket_only(
    tmp_path: Path,
    sock_dir: Path,
    fake_runc_env: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    bundle = make_bundle(tmp_path, tmp_path / "runc-root")
    sock_dir.mkdir()
    dead_path = sock_dir / "dead"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(dead_path))
    dead.close()
    (bundle / "address").write_text(f"unix://{dead_path}")
    flags = Flags(namespace="unitns", id="t1", bundle=str(bundle), action="delete")
    assert manager.delete(flags) == 0
    assert not dead_path.exists()
    response = shim_pb2.DeleteResponse.FromString(capfdbinary.readouterr().out)
    assert response.exit_status == 137

    live_path = sock_dir / "live"
    live = listening_at(live_path)
    try:
        (bundle / "address").write_text(f"unix://{live_path}")
        assert manager.delete(flags) == 0
        assert live_path.exists()  # a grouped shim still serves it
    finally:
        live.close()
    assert shim_pb2.DeleteResponse.FromString(capfdbinary.readouterr().out).exit_status == 137


def test_delete_never_removes_sockets_outside_socket_dir(
    tmp_path: Path, sock_dir: Path, fake_runc_env: Path
) -> None:
    bundle = make_bundle(tmp_path, tmp_path / "runc-root")
    outside = tmp_path / "other.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(outside))
    dead.close()
    (bundle / "address").write_text(f"unix://{outside}")
    assert manager.delete(Flags(namespace="unitns", id="t1", bundle=str(bundle))) == 0
    assert outside.exists()


def test_info_answers_a_runtime_info(
    capfdbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shimv2.api.containerd.types import introspection_pb2

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert manager.info() == 0
    out, err = capfdbinary.readouterr()
    assert err == b""
    assert introspection_pb2.RuntimeInfo.FromString(out).name == "io.containerd.pyshim.v2"


def sched_core_cookie(pid: int) -> int | None:
    """The core-scheduling cookie of ``pid``; None when the kernel has no core scheduling."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    cookie = ctypes.c_ulong(0)
    pr_sched_core, pr_sched_core_get, pidtype_pid = 62, 0, 0
    if libc.prctl(pr_sched_core, pr_sched_core_get, pid, pidtype_pid, ctypes.byref(cookie)):
        return None
    return cookie.value


def test_real_start_with_sched_core(real_shim: RealShim) -> None:
    # containerd sets SCHED_CORE=1 when its runtime config says sched_core = true.
    bundle = real_shim.bundle("b1")
    result = subprocess.run(
        real_shim.argv(),
        cwd=bundle,
        env={**real_shim.env(), "SCHED_CORE": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=20,
    )
    real_shim.sockets.append(real_shim.expected_path())
    pid = bundlefiles.read_pid(str(bundle / "shim.pid"))
    if pid > 0:
        real_shim.daemons.append(pid)
    if sched_core_cookie(os.getpid()) is None:
        # No core scheduling in this kernel: like the Go shim, start fails clearly
        # and leaves no daemon and no socket behind.
        assert result.returncode == 1
        assert b"enable sched core support" in result.stderr, result.stderr
        assert pid == 0 and not real_shim.daemons_of_namespace()
        assert not os.path.exists(real_shim.expected_path())
        return
    assert result.returncode == 0, result.stderr
    assert sched_core_cookie(pid), "the daemon has no core-scheduling cookie"
    trio.run(connect_and_shutdown, f"unix://{real_shim.expected_path()}", "t1")


def test_delete_knows_the_debug_socket_name() -> None:
    # `delete` removes a dead daemon's debug socket without importing shimv2.debug
    from shimv2 import debug

    assert manager.DEBUG_SOCKET_SUFFIX == debug.SOCKET_SUFFIX
