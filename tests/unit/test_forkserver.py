"""The fork server (shimv2/forkserver.py) with a private server directory.

The shim binary is the launcher in the venv (what containerd runs): the native
one (shimv2/launcher.c) and the Python one it falls back to, both clients of
the same protocol; each test starts its own server under tmp_path and stops it
by pid.
"""

from __future__ import annotations

import contextlib
import json
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
from shimv2 import forkserver, launcher
from shimv2.api.containerd.task.v2 import shim_pb2

BINARY = str(Path(sys.executable).parent / "containerd-shim-pyshim-v2")
NATIVE = launcher.is_native(BINARY)
PYTHON_LAUNCHER = BINARY + ".py" if NATIVE else BINARY


@pytest.fixture(params=["native", "python"])
def client(request: pytest.FixtureRequest) -> str:
    """The binary containerd runs: the native launcher, or the Python one."""
    if request.param == "native" and not NATIVE:
        pytest.skip("the venv was built without a C compiler: no native launcher")
    return BINARY if request.param == "native" else PYTHON_LAUNCHER


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
    bundle: Path, env: dict[str, str], *prefix: str, binary: str = BINARY
) -> subprocess.CompletedProcess[bytes]:
    argv = [*prefix, binary, "-namespace", "unitns", "-id", "t1", "-bundle", str(bundle), "delete"]
    return subprocess.run(
        argv, cwd=bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )


def test_delete_runs_in_the_fork_server(server: Server, tmp_path: Path, client: str) -> None:
    bundle = make_bundle(tmp_path)
    result = run_delete(bundle, _env(server.dir), binary=client)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    response = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert (response.pid, response.exit_status) == (0, 7)
    assert response.exited_at.ToNanoseconds() == 1_700_000_000_000_000_001
    assert "delete runs in child" in server.log_text()


def test_exit_status_and_stderr_come_back(server: Server, tmp_path: Path, client: str) -> None:
    """A failing start through the server fails exactly as a local one."""
    env = _env(server.dir)
    result = subprocess.run(
        [client, "-id", "x", "-address", "/nowhere", "start"],
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
    server: Server, tmp_path: Path, client: str
) -> None:
    bundle = make_bundle(tmp_path)
    result = run_delete(bundle, _env(server.dir), "unshare", "--mount", "--", binary=client)
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7
    assert "other namespaces" in server.log_text()
    assert "delete runs in child" not in server.log_text()


def test_no_server_means_a_local_run(tmp_path: Path, client: str) -> None:
    bundle = make_bundle(tmp_path)
    result = run_delete(bundle, _env(tmp_path / "nothing-here"), binary=client)
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7
    assert not (tmp_path / "nothing-here").exists()  # delete never launches a server


def spare_of(server: Server) -> psutil.Process:
    """The child the server forked ahead, waiting for the next request."""
    deadline = time.monotonic() + 10
    while True:
        children = psutil.Process(server.proc.pid).children()
        if len(children) == 1:
            return children[0]
        assert time.monotonic() < deadline, children
        time.sleep(0.02)


def test_a_killed_server_is_not_needed(server: Server, tmp_path: Path, client: str) -> None:
    spare = spare_of(server)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    spare.wait(10)  # it dies with the server (PR_SET_PDEATHSIG)
    assert server.sock.exists()  # stale socket: connection refused
    bundle = make_bundle(tmp_path)
    result = run_delete(bundle, _env(server.dir), binary=client)
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
    [
        b"",
        b"garbage",
        b"\xff" * 100,
        forkserver.MAGIC + b"\0",
        forkserver.MAGIC + b"\0x\0delete\0",
        forkserver.MAGIC + b"\05\0delete\0",
        forkserver.MAGIC + b"\01\0delete",  # not NUL-ended
        b"pyshim-forkserver 2\0" + b"1\0delete\0",
    ],
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


def test_version_tag_follows_the_contents_not_the_mtimes(tmp_path: Path) -> None:
    """A package keeps its tag through a tar (mtimes) or a relocation (paths)."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    first = forkserver.version_tag(str(package))
    assert forkserver.version_tag(str(package)) == first
    os.utime(package / "a.py", ns=(1, 1))
    assert forkserver.version_tag(str(package)) == first
    moved = tmp_path / "elsewhere" / "pkg"
    shutil.copytree(package, moved)
    assert forkserver.version_tag(str(moved)) == first
    (moved / "a.py").write_text("x = 2\n")  # same size, other contents
    assert forkserver.version_tag(str(moved)) != first
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
    spare = spare_of(server)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert not server.sock.exists() and not server.pidfile.exists()
    spare.wait(10)


def test_a_request_takes_the_spare_and_a_new_one_waits(server: Server, tmp_path: Path) -> None:
    first = spare_of(server)
    bundle = make_bundle(tmp_path)
    assert run_delete(bundle, _env(server.dir)).returncode == 0
    assert f"runs in child {first.pid}" in server.log_text()
    second = spare_of(server)  # the command's child is reaped at once (SIGCHLD)
    assert second.pid != first.pid
    assert second.cmdline()[-2:] == ["forkserver", server.tag]


def test_a_killed_spare_is_replaced_at_once(server: Server, tmp_path: Path) -> None:
    first = spare_of(server)
    first.kill()
    first.wait(10)
    bundle = make_bundle(tmp_path)
    started = time.monotonic()
    result = run_delete(bundle, _env(server.dir))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 4  # not after the server's 5 s tick
    assert f"spare child {first.pid} died" in server.log_text()
    assert "delete runs in child" in server.log_text()


def _fake_server(
    directory: Path,
    answers: list[bytes],
    received: list[bytes] | None = None,
    delay: float = 0.0,
) -> tuple[socket.socket, threading.Thread]:
    """A socket at the real server's path that takes one request (appended to
    ``received``) and answers ``answers``, then hangs up: a server dying at a
    chosen moment."""
    directory.mkdir(mode=0o700)
    path = forkserver.paths(str(directory), forkserver.version_tag())[0]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        data, fds, _, _ = socket.recv_fds(conn, forkserver.MAX_REQUEST, 8)
        if received is not None:
            received.append(data)
        for fd in fds:  # the caller's stdout among them: holding it would keep it open
            os.close(fd)
        time.sleep(delay)
        for answer in answers:
            conn.send(answer)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_server_gone_before_forking_means_a_local_run(
    server_dir: Path, tmp_path: Path, client: str
) -> None:
    listener, thread = _fake_server(server_dir, [])  # hangs up without a word
    try:
        result = run_delete(make_bundle(tmp_path), _env(server_dir), binary=client)
    finally:
        thread.join(10)
        listener.close()
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7


def test_a_command_cut_short_is_not_run_twice(
    server_dir: Path, tmp_path: Path, client: str
) -> None:
    listener, thread = _fake_server(server_dir, [b"ack"])  # forked, then died
    try:
        result = run_delete(make_bundle(tmp_path), _env(server_dir), binary=client)
    finally:
        thread.join(10)
        listener.close()
    assert (result.returncode, result.stdout) == (1, b"")
    assert b"cut short" in result.stderr


def _can_raise_hard_limits() -> bool:
    return bool(int(forkserver._status_fields("/proc/self/status")["CapEff"], 16) & 1 << 24)


def test_a_context_it_cannot_take_over_is_refused_after_the_ack(
    server: Server, tmp_path: Path
) -> None:
    """A hard rlimit the child cannot raise is a refusal after the ack, not "exit 1"."""
    if _can_raise_hard_limits():
        pytest.skip("CAP_SYS_RESOURCE: the child could take over any rlimit")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (min(soft, 512), 512))
    # the spare child waiting now was forked before: one request, and the next has the limit
    assert run_delete(make_bundle(tmp_path), _env(server.dir)).returncode == 0
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(str(server.sock))
    cwd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        request = forkserver.encode_request(["-namespace", "x", "-id", "t1", "delete"], {})
        socket.send_fds(conn, [request], [0, 1, 2, cwd])
        assert conn.recv(100) == b"ack"
        answer = conn.recv(1000)
    finally:
        os.close(cwd)
        conn.close()
    assert hard > 512
    assert answer.startswith(b"refused cannot take over the caller's context"), answer


def test_the_daemon_takes_over_the_callers_umask_rlimits_nice_and_affinity(
    server: Server, tmp_path: Path, client: str
) -> None:
    """Read from /proc/<peer> by the server, not sent by the client."""
    import resource

    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    os.mkfifo(bundle / "log", 0o700)
    log_reader = os.open(bundle / "log", os.O_RDWR | os.O_NONBLOCK)  # containerd's
    argv = f"{client} -namespace unitfs-{os.getpid()} -address /tmp/{os.urandom(8).hex()}/c.sock"
    env = {k: v for k, v in _env(server.dir).items() if k != "TTRPC_ADDRESS"}
    result = subprocess.run(
        ["sh", "-c", f"umask 027; ulimit -S -n 777; exec nice -n 3 taskset -c 0 {argv} -id t1 start"],  # noqa: E501
        cwd=bundle, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )  # fmt: skip
    pid = bundlefiles.read_pid(str(bundle / "shim.pid"))
    try:
        assert result.returncode == 0, result.stderr
        assert "start runs in child" in server.log_text()
        assert forkserver._status_fields(f"/proc/{pid}/status")["Umask"] == "0027"
        assert resource.prlimit(pid, resource.RLIMIT_NOFILE)[0] == 777
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 3
        assert os.sched_getaffinity(pid) == {0}
    finally:
        if pid > 0:
            os.kill(pid, signal.SIGKILL)
        os.close(log_reader)
        socket_path = result.stdout.decode().removeprefix("unix://")
        if socket_path.startswith("/"):
            Path(socket_path).unlink(missing_ok=True)


def test_containerd_2_start_input_reaches_the_command(
    server: Server, tmp_path: Path, client: str
) -> None:
    """containerd 2.3 writes BootstrapParams to start's stdin and reads a
    BootstrapResult: through the server, stdin and stdout are the caller's."""
    from shimv2.api.containerd.runtime.bootstrap.v1 import bootstrap_pb2

    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    os.mkfifo(bundle / "log", 0o700)
    log_reader = os.open(bundle / "log", os.O_RDWR | os.O_NONBLOCK)
    namespace = f"unitfs-{os.getpid()}"
    socket_dir = server.dir.parent / "s"  # short: a unix socket path ends at 108 bytes
    params = bootstrap_pb2.BootstrapParams(
        instance_id="t1", namespace=namespace, socket_dir=str(socket_dir)
    ).SerializeToString()
    argv = [client, "-namespace", namespace, "-address", f"/tmp/{os.urandom(8).hex()}/c.sock"]
    env = {k: v for k, v in _env(server.dir).items() if k != "TTRPC_ADDRESS"}
    result = subprocess.run(
        [*argv, "-id", "t1", "start"], cwd=bundle, env=env, input=params,
        capture_output=True, timeout=30,
    )  # fmt: skip
    pid = bundlefiles.read_pid(str(bundle / "shim.pid"))
    try:
        assert result.returncode == 0, result.stderr
        assert "start runs in child" in server.log_text()
        answer = bootstrap_pb2.BootstrapResult.FromString(result.stdout)
        assert answer.protocol == "ttrpc"
        assert answer.address.startswith(f"unix://{socket_dir}/")
        assert Path(answer.address.removeprefix("unix://")).is_socket()
    finally:
        if pid > 0:
            os.kill(pid, signal.SIGKILL)
        os.close(log_reader)
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_both_clients_send_the_same_request(server_dir: Path, tmp_path: Path) -> None:
    if not NATIVE:
        pytest.skip("the venv was built without a C compiler: no native launcher")
    requests: list[bytes] = []
    env = {**_env(server_dir), "ODD": "a=b\tc", "EMPTY": ""}
    bundle = make_bundle(tmp_path)
    for binary in (BINARY, PYTHON_LAUNCHER):
        listener, thread = _fake_server(server_dir, [b"exit 3"], requests)
        try:
            result = run_delete(bundle, env, binary=binary)
        finally:
            thread.join(10)
            listener.close()
            shutil.rmtree(server_dir)
        assert result.returncode == 3, result.stderr
    native, python = requests
    assert native.split(b"\0")[:9] == python.split(b"\0")[:9]
    assert sorted(native.split(b"\0")[9:]) == sorted(python.split(b"\0")[9:])
    fields = native.split(b"\0")
    assert fields[:3] == [forkserver.MAGIC, b"7", b"-namespace"]
    assert b"ODD=a=b\tc" in fields and b"EMPTY=" in fields


def test_the_native_launcher_runs_other_commands_in_python(client: str) -> None:
    result = subprocess.run([client, "-v"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("containerd-shim-pyshim-v2:\n  Version:")


def test_the_native_launcher_falls_back_when_disabled(server: Server, tmp_path: Path) -> None:
    if not NATIVE:
        pytest.skip("the venv was built without a C compiler: no native launcher")
    result = run_delete(make_bundle(tmp_path), _env(server.dir, PYSHIM_FORKSERVER="off"))
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7
    assert "runs in child" not in server.log_text()


def test_an_environment_too_big_for_one_request_runs_locally(
    server: Server, tmp_path: Path, client: str
) -> None:
    chunk = "x" * (100 << 10)  # one variable may not exceed 128 KiB (MAX_ARG_STRLEN)
    big = {f"BIG{i}": chunk for i in range(forkserver.MAX_REQUEST // len(chunk) + 1)}
    env = _env(server.dir, **big)
    result = run_delete(make_bundle(tmp_path), env, binary=client)
    assert result.returncode == 0, result.stderr
    assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7
    assert "runs in child" not in server.log_text()


def test_a_server_whose_files_changed_refuses_and_exits(server_dir: Path, tmp_path: Path) -> None:
    """An edit (or upgrade) after the server started: it never forks that code."""
    package = tmp_path / "copy" / "shimv2"
    shutil.copytree(
        Path(forkserver.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    run_copy = (
        f"import sys; sys.path.insert(0, {str(package.parent)!r}); "
        "from shimv2 import cli; sys.exit(cli.main(['forkserver', *sys.argv[1:]]))"
    )
    copy_tag = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(package.parent)!r}); "
         "from shimv2 import forkserver; print(forkserver.version_tag())"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", run_copy, copy_tag],
        env=_env(server_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock = Path(forkserver.paths(str(server_dir), copy_tag)[0])
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.utime(package / "journal.py")  # any source file of the server's copy
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.settimeout(10)
        conn.connect(str(sock))
        cwd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            request = forkserver.encode_request(["-namespace", "x", "-id", "t1", "delete"], {})
            socket.send_fds(conn, [request], [0, 1, 2, cwd])
            assert conn.recv(100) == b"refused the fork server is out of date"
        finally:
            os.close(cwd)
            conn.close()
        assert proc.wait(10) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_unchanged_sees_size_and_mtime(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    files = forkserver.source_files(str(tmp_path))
    assert [Path(p).name for p, _, _ in files] == ["a.py"]
    assert forkserver._unchanged(files)
    os.utime(tmp_path / "a.py", ns=(1, 1))
    assert not forkserver._unchanged(files)
    assert not forkserver._unchanged([(str(tmp_path / "gone.py"), 0, 0)])


def test_a_server_that_refuses_everyone_still_goes_idle(server_dir: Path) -> None:
    s = Server(server_dir, idle="2")
    try:
        deadline = time.monotonic() + 8
        while s.proc.poll() is None and time.monotonic() < deadline:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.connect(str(s.sock))
                conn.send(b"garbage")
                assert conn.recv(200).startswith(b"refused ")
            conn.close()
            time.sleep(0.3)
        assert s.proc.poll() == 0, "refused requests kept the server alive"
    finally:
        s.stop()


def test_clients_never_talk_to_a_server_of_another_user(
    server_dir: Path, tmp_path: Path, client: str
) -> None:
    """A socket someone else put where the server's would be gets nothing."""
    server_dir.mkdir(mode=0o777)
    server_dir.chmod(0o777)
    server_dir.parent.chmod(0o755)
    path = forkserver.paths(str(server_dir), forkserver.version_tag())[0]
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the impostor
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listener.bind(path)
            listener.listen(1)
            os.write(ready_w, b"x")
            listener.settimeout(10)
            conn, _ = listener.accept()
            conn.settimeout(2)
            try:
                data = conn.recv(1 << 20)
            except OSError:
                data = b""
            conn.send(b"exit 0")
            os.write(ready_w, b"got" if data else b"nothing")
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        result = run_delete(make_bundle(tmp_path), _env(server_dir), binary=client)
        assert result.returncode == 0, result.stderr
        assert shim_pb2.DeleteResponse.FromString(result.stdout).exit_status == 7
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)


def test_the_native_launcher_replaced_while_it_waits_still_falls_back(tmp_path: Path) -> None:
    """An upgrade renames a new binary over the one that runs: /proc/self/exe then
    ends in " (deleted)", and the Python launcher next to it must still be found."""
    if not NATIVE:
        pytest.skip("the venv was built without a C compiler: no native launcher")
    base = Path(tempfile.mkdtemp(prefix="fsr-", dir="/tmp"))
    try:
        binary = base / "shim"
        shutil.copy2(BINARY, binary)
        shutil.copy2(PYTHON_LAUNCHER, f"{binary}.py")
        # answers nothing and hangs up, a second after the request
        listener, thread = _fake_server(base / "d", [], delay=1.0)
        env = _env(base / "d")
        bundle = make_bundle(tmp_path)
        argv = [str(binary), "-namespace", "unitns", "-id", "t1", "-bundle", str(bundle), "delete"]
        proc = subprocess.Popen(
            argv, cwd=bundle, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(0.3)  # it waits for the server's answer now
        shutil.copy2(BINARY, base / "shim.new")
        os.rename(base / "shim.new", binary)  # the upgrade
        thread.join(10)
        listener.close()
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert shim_pb2.DeleteResponse.FromString(stdout).exit_status == 7
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_pidfd_tells_a_caller_that_is_gone() -> None:
    """The spare refuses a peer that exited after connecting (its pid may be reused)."""
    child = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(child.pid)
    try:
        assert not forkserver._exited(pidfd)
        child.kill()
        child.wait(10)
        assert forkserver._exited(pidfd)
    finally:
        os.close(pidfd)


def test_security_labels_are_compared_like_namespaces() -> None:
    labels = forkserver._security_labels()
    assert len(labels) == len(forkserver.SECURITY_LABELS)
    assert forkserver._security_labels(f"/proc/{os.getpid()}") == labels


SET_ARGV = """
import sys
from shimv2 import forkserver
forkserver._set_cmdline("a title")  # the server's; its children then set argv
forkserver._set_argv(sys.argv[2:-1])
with open("/proc/self/cmdline", "rb") as f:
    sys.stdout.buffer.write(f.read())
forkserver._set_argv(["short", "-x"])  # again, shorter: the area as exec'd is kept
with open("/proc/self/cmdline", "rb") as f:
    sys.stdout.buffer.write(b"|" + f.read())
blocks = [bytearray(1 << 16) for _ in range(2000)]  # the heap (brk) still grows
"""


def test_set_argv_gives_a_nul_separated_cmdline() -> None:
    """What the daemon forked from a server shows: argv as if exec'd with it."""
    argv = ["/usr/bin/python3", "-I", "/x/shim.py", "-namespace", "n s", "-id", "c1", "-debug"]
    out = subprocess.run(
        [sys.executable, "-c", SET_ARGV, "--", *argv, "#" * forkserver.TITLE_ROOM],
        capture_output=True,
        check=True,
    ).stdout
    first, second = out.split(b"|")
    assert first == b"\0".join(map(str.encode, argv)) + b"\0"
    assert second == b"short\0-x\0"
