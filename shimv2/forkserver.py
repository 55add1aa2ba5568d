"""A per-node fork server: ``start``, ``delete`` and the daemon without Python's
start-up cost.

containerd runs the shim binary for every ``start`` and (1.6/1.7) every task
``delete``, and a fresh interpreter needs ~130 ms and ~20 MiB of private memory
to import trio, protobuf and the shim before a daemon can serve. The fork
server pays that once: it imports everything, ``gc.freeze()``s the heap and
keeps one child forked ahead ("spare") waiting on a root-only socket. The
binary (a small C program, shimv2/launcher.c, or where no compiler was found
the Python launcher: see shimv2.launcher) sends its command line and
environment, and its stdin/stdout/stderr/working directory over SCM_RIGHTS.
The spare takes the connection (the server forks the next one), adopts the
caller's session, cgroups, rlimits, umask, nice value and CPU affinity (read
from the kernel, /proc/PID of the peer), runs the very same command line the
caller would have run, and answers with its exit status. After a ``start``
it then becomes that shim's daemon itself: no fork, no exec, no imports, the
frozen pages shared copy-on-write with its siblings. Its parent is the server
(which reaps it) instead of init; nothing else tells it from a daemon started
directly.

It never imports the modules it serves: ``cli`` hands ``main`` the function
that runs a command line and the one that imports everything ahead (the
``forkserver`` action), and ``start`` leaves the daemon to become in
shimv2.handoff.

Rules that keep it safe:

- Nothing depends on it: when no server answers, the binary runs the command
  itself (and ``start`` launches a server in the background for next time).
  Running shims never talk to it; killing it breaks nothing.
  ``PYSHIM_FORKSERVER=0`` turns it off.
- One version per server: the socket is named after a digest of the
  interpreter and every source file of this package, so a new pyshim (or an
  edited checkout) never runs in an old server. A server checks its files
  before every fork: once one changed it refuses and exits (the native
  launcher's tag is fixed when it is built, see launcher.c); idle, it exits too.
- Root-only: the directory is 0700, the socket 0600, and a peer whose uid is
  not ours is refused.
- The child must be what a direct run would be. What it cannot take over
  (other namespaces or root, a higher hard rlimit) makes the server refuse
  before anything ran, and the caller runs the command itself.
"""

from __future__ import annotations

import _socket
import os
import struct
import sys
import time

from shimv2 import handoff

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: start never loads typing
if TYPE_CHECKING:
    from collections.abc import Callable

    #: Runs a command line of the shim binary in this process; its exit status.
    Command = Callable[[list[str]], int]

DEFAULT_DIR = "/run/pyshim"
DIR_ENV = "PYSHIM_FORKSERVER_DIR"
ENABLE_ENV = "PYSHIM_FORKSERVER"  # "0" / "off" / "false": never use a fork server
TRIED_ENV = "PYSHIM_FORKSERVER_TRIED"  # the native launcher asked the server of this tag
IDLE_ENV = "PYSHIM_FORKSERVER_IDLE"  # seconds without a request before it exits
DEFAULT_IDLE = 600.0
PROTOCOL = 3
# A request: MAGIC, argc, argv[1:], then the environment ("K=V"), each NUL-ended.
MAGIC = b"pyshim-forkserver 3"
MAX_REQUEST = 1 << 20
# The caller's stdin, stdout, stderr and working directory, in this order.
PASSED_FDS = 4
NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup", "time")
# /proc/PID/status fields that must match: a confined caller stays confined.
CONFINEMENT = (
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
)
# The LSM label (AppArmor, SELinux): /proc/PID/attr/current, and AppArmor's own.
SECURITY_LABELS = ("attr/current", "attr/apparmor/current")
# rlimits the child takes over from the caller (containerd's own limits, read
# with prlimit(2) from the peer).
RLIMITS = (
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_CORE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_STACK",
    "RLIMIT_AS",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
)
# Room in the server's own argv area for a daemon's command line (_set_argv).
TITLE_ROOM = 2048
LOG_LIMIT = 1 << 20
# A burst of starts and deletes queues instead of failing (as the shims' sockets).
LISTEN_BACKLOG = 4096


class Unavailable(Exception):
    """No fork server took the request: nothing ran, run it yourself."""


class ForkServerError(Exception):
    """The request may have run: running it again could do things twice."""


def enabled(environ: dict[str, str] | os._Environ[str]) -> bool:
    return environ.get(ENABLE_ENV, "1").lower() not in ("0", "off", "false", "no")


def server_dir(environ: dict[str, str] | os._Environ[str]) -> str:
    return environ.get(DIR_ENV) or DEFAULT_DIR


def _sha256() -> type:
    try:  # the builtin module: hashlib would load OpenSSL (~3 ms) for one digest
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:
        from hashlib import sha256
    return sha256  # type: ignore[no-any-return]


def source_files(package: str = "") -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every source file of this package."""
    package = package or os.path.dirname(os.path.realpath(__file__))
    found = []
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".so", ".c")):
                path = os.path.join(root, name)
                st = os.stat(path)
                found.append((path, st.st_size, st.st_mtime_ns))
    return found


def version_tag(package: str = "") -> str:
    """Digest of the interpreter and of every source file of this package (path
    inside the package and contents, ~2 ms): any upgrade or edit gives a new
    server. No absolute paths and no mtimes: a package built in a staging
    directory (build-deb.sh, also with SOURCE_DATE_EPOCH) keeps, once installed,
    the tag its native launcher was built with."""
    package = package or os.path.dirname(os.path.realpath(__file__))
    return _digest(package, source_files(package))


def _digest(package: str, files: list[tuple[str, int, int]]) -> str:
    digest = _sha256()(f"{PROTOCOL}\0{os.path.realpath(sys.executable)}\0{sys.version}".encode())
    for path, _, _ in files:
        with open(path, "rb") as f:
            data = f.read()
        digest.update(f"{os.path.relpath(path, package)}\0{len(data)}\0".encode())
        digest.update(data)
    return str(digest.hexdigest()[:20])


def _unchanged(files: list[tuple[str, int, int]]) -> bool:
    """None of ``files`` changed (~70 us: cheap enough for every request)."""
    try:
        for path, size, mtime in files:
            st = os.stat(path)
            if st.st_size != size or st.st_mtime_ns != mtime:
                return False
    except OSError:
        return False
    return True


def paths(directory: str, tag: str) -> tuple[str, str, str, str]:
    """socket, lock, log and pid file of the server for ``tag``."""
    base = os.path.join(directory, f"forkserver-{tag}")
    return base + ".sock", base + ".lock", base + ".log", base + ".pid"


def _namespaces(proc: str = "/proc/self") -> dict[str, int]:
    found = {}
    for name in NAMESPACES:
        try:
            found[name] = os.stat(f"{proc}/ns/{name}").st_ino
        except FileNotFoundError:
            pass  # a kernel without that namespace type
    root = os.stat(f"{proc}/root")
    found["root"] = root.st_dev << 32 | root.st_ino  # a chroot counts as a namespace
    return found


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


# -- client: runs in every start/delete, so standard C modules only -------------


def run(argv: list[str], tag: str = "", timeout: float = 120.0) -> int:
    """Run ``argv`` (our command line minus the program) in a fork of the server;
    its exit status. Raises Unavailable when nothing ran."""
    environ = os.environ
    path = paths(server_dir(environ), tag or version_tag())[0]
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    cwd_fd = -1
    try:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
            creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        except OSError as exc:
            raise Unavailable(f"no fork server at {path}: {exc}") from exc
        if struct.unpack("3i", creds)[1] != os.geteuid():
            raise Unavailable(f"{path} is served by another user")  # never ours
        cwd_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds = struct.pack("4i", 0, 1, 2, cwd_fd)
        try:
            conn.sendmsg(
                [encode_request(argv, os.environb)], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)]
            )
        except OSError as exc:
            raise Unavailable(f"fork server at {path} did not take the request: {exc}") from exc
        started = False  # the server forked a child for us ("ack")
        while True:
            try:
                data = conn.recv(4096)
            except TimeoutError as exc:
                late = f"fork server at {path}: no answer in {timeout:.0f}s"
                raise ForkServerError(late) from exc
            except OSError as exc:
                data = b""  # reset: the server went away
                if started:
                    raise ForkServerError(f"fork server at {path} failed: {exc}") from exc
            if data == b"ack":
                started = True
                continue
            return _exit_status(data, path, started)
    finally:
        conn.close()
        if cwd_fd >= 0:
            os.close(cwd_fd)


def encode_request(argv: list[str], environb: dict[bytes, bytes] | os._Environ[bytes]) -> bytes:
    """What launcher.c sends: MAGIC, argc, argv, the environment, each NUL-ended."""
    fields = [MAGIC, str(len(argv)).encode(), *map(os.fsencode, argv)]
    fields += [key + b"=" + value for key, value in environb.items()]
    return b"\0".join(fields) + b"\0"


def _exit_status(data: bytes, path: str, started: bool) -> int:
    """b"exit N" after the command ran; b"refused WHY" when nothing ran; the end
    of the connection means nothing ran only before the child's b"ack"."""
    if data.startswith(b"exit "):
        try:
            return int(data[5:])
        except ValueError:
            pass
    if data.startswith(b"refused "):
        raise Unavailable(f"fork server refused: {data[8:].decode(errors='replace')}")
    if not data and not started:  # the server died (or exited) before forking for us
        raise Unavailable(f"fork server at {path} closed the connection")
    if not data:
        raise ForkServerError(f"fork server at {path}: the command was cut short")
    raise ForkServerError(f"fork server at {path} answered {data[:100]!r}")


def launch(tag: str = "") -> None:
    """Start a fork server in the background for the next calls (never waits).
    Racing launches are fine: the losers of the lock exit at once."""
    from shimv2.flags import self_command

    argv = [*self_command(), "forkserver", tag or version_tag(), "#" * TITLE_ROOM]
    try:  # no server this time: the next start tries again
        os.posix_spawn(
            argv[0],
            argv,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,
        )
    except OSError:
        pass
    # When we exit, the server is re-parented to init.


# -- server ----------------------------------------------------------------------

_log_fd = -1
_server_fds: list[int] = []  # listener, lock and notify pipe: a child closes them at once
_files: list[tuple[str, int, int]] = []  # the source files this server runs
# What a caller must share with the server (see _check_peer), read once.
_own_namespaces: dict[str, int] = {}
_own_status: dict[str, str] = {}
PR_SET_PDEATHSIG = 1
# A spare child tells the server: it took a connection (fork the next spare), then
# that it serves the request (only those keep an idle server alive: one that
# refuses every caller goes away); or that the server's files changed.
TOOK, SERVING, OUT_OF_DATE = b"t", b"s", b"o"
SO_PEERPIDFD = 77  # Linux 6.5+: a pidfd of the peer, to see that it is still the same
_own_labels: tuple[str | None, ...] = ()


class _Refused(Exception):
    """Answered as ``refused``; nothing ran."""


def serve(tag: str, command: Command, preload: Callable[[], None]) -> int:
    """Run the fork server for ``tag`` until it is idle or out of date: each
    request runs ``command`` in a child, after ``preload`` ran here once."""
    import fcntl
    import gc
    import stat

    directory = server_dir(os.environ)
    sock_path, lock_path, log_path, pid_path = paths(directory, tag)
    package = os.path.dirname(os.path.realpath(__file__))
    _files[:] = source_files(package)  # before the imports: a later edit shows
    if tag != _digest(package, _files):
        return 1  # the files changed between the launch and now
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return 1
    os.chmod(directory, 0o700)
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another server for this version runs already
    _remove_dead_servers(directory, lock_path)
    global _log_fd
    _log_fd = os.open(
        log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600
    )
    os.dup2(_log_fd, 2)  # tracebacks of the server itself
    import resource  # noqa: F401  (_max_fd, _check_peer, _adopt_context)
    import select  # noqa: F401

    preload()
    with open(pid_path, "w") as f:
        f.write(str(os.getpid()))
    idle = float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE)
    # with the release's path, so that installers find (and stop) an old one
    _set_cmdline(f"{os.path.realpath(sys.argv[0])} forkserver {tag}")
    _own_namespaces.update(_namespaces())
    _own_status.update(_status_fields("/proc/self/status"))
    global _own_labels
    _own_labels = _security_labels()
    gc.collect()
    gc.freeze()  # the collector never touches (so never copies) these pages again
    from shimv2 import ksm

    if ksm.enabled(os.environ):
        # Our pages (and, inherited, our daemons'): their copies merge with them.
        ksm.Marker().mark()
    import signal

    # SIGTERM (installers stopping an old release) cleans up like an idle exit;
    # set before the socket appears, so that a stop never meets a half-started server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    bound = -1
    listener = None
    try:
        listener = _bind(sock_path)
        bound = os.stat(sock_path).st_ino  # fstat of a socket names sockfs, not the path
        _log(f"serving {sock_path} (pid {os.getpid()}, idle timeout {idle:.0f}s)")
        _supervise_spares(listener, lock_fd, sock_path, bound, idle, command)
    finally:
        try:
            found = os.stat(sock_path).st_ino
        except OSError:
            found = bound = -1  # never bound, or removed: nothing to tell ours apart
        if found == bound:  # unless another server replaced our socket, the files are ours
            for path in (sock_path, pid_path, log_path, lock_path):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if listener is not None:
            listener.close()
    return 0


def _remove_dead_servers(directory: str, own_lock: str) -> None:
    """Files of servers that died without cleaning up (SIGKILL): a lock nobody holds."""
    import fcntl

    for name in os.listdir(directory):
        lock = os.path.join(directory, name)
        if not (name.startswith("forkserver-") and name.endswith(".lock")) or lock == own_lock:
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # that server is alive
            continue
        base = lock[: -len(".lock")]
        for path in (base + ".sock", base + ".pid", base + ".log", lock):
            try:
                os.unlink(path)
            except OSError:
                pass
        os.close(fd)


def _log(message: str) -> None:
    """To the server's log file (stderr until it is open)."""
    try:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n"
        if _log_fd >= 0 and os.fstat(_log_fd).st_size > LOG_LIMIT:
            os.ftruncate(_log_fd, 0)  # it lives in /run, i.e. in memory
        os.write(_log_fd if _log_fd >= 0 else 2, line.encode())
    except OSError:
        pass


def _bind(path: str) -> _socket.socket:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    listener.bind(tmp)
    os.chmod(tmp, 0o600)
    listener.listen(LISTEN_BACKLOG)
    os.rename(tmp, path)  # appears only once it accepts
    return listener


def _supervise_spares(
    listener: _socket.socket, lock_fd: int, path: str, inode: int, idle: float, command: Command
) -> None:
    """Keep one child forked ahead of time, blocked in accept(): a request never
    waits for a fork (~1-2 ms, most of it the child's first run copying the pages
    it touches). The spare tells us when it took a connection; we fork the next.
    SIGCHLD wakes us too (signal.set_wakeup_fd): finished commands are reaped at
    once, and a spare that died (killed) is replaced at once."""
    import select
    import signal

    notify_r, notify_w = os.pipe()
    os.set_blocking(notify_w, False)  # set_wakeup_fd wants it; spares write one byte
    _server_fds[:] = [listener.fileno(), lock_fd, notify_r, notify_w]
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that it wakes us
    signal.set_wakeup_fd(notify_w)
    spare = _fork_spare(listener, notify_w, command)
    last_request = time.monotonic()
    while True:
        ready, _, _ = select.select([notify_r], [], [], min(5.0, idle))
        news = os.read(notify_r, 4096) if ready else b""
        if OUT_OF_DATE in news:
            _log("source files changed: exiting")
            return
        if SERVING in news:
            last_request = time.monotonic()
        if TOOK in news:
            spare = _fork_spare(listener, notify_w, command)
        if time.monotonic() - last_request >= idle:
            _log("idle: exiting")
            return  # the spare dies with us (PR_SET_PDEATHSIG)
        if not ready and not _still_current(path, inode):
            _log("out of date or replaced: exiting")
            return
        if spare in _reap():  # killed (or crashed) while waiting
            _log(f"spare child {spare} died: forking another")
            spare = _fork_spare(listener, notify_w, command)


def _reap() -> set[int]:
    """Collect finished children (each lives as long as one command)."""
    reaped: set[int] = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)


def _still_current(path: str, inode: int) -> bool:
    """Our socket is still the one at ``path`` and our files did not change."""
    try:
        return os.stat(path).st_ino == inode and _unchanged(_files)
    except OSError:
        return False


def _fork_spare(listener: _socket.socket, notify_w: int, command: Command) -> int:
    """Fork a child that waits for the next connection and serves it."""
    import signal

    server = os.getpid()
    # A SIGTERM between fork and the reset below would run the server's clean-up
    # in the child (removing the live server's files): hold it until then.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    child = os.fork()
    if child != 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return child  # reaped by _supervise_spares
    status = 1
    try:
        status = _spare(listener, notify_w, server, command)
    except BaseException as exc:  # never back into the server's loop
        _log(f"request failed: {exc!r}")
    finally:
        os._exit(status)


def _spare(listener: _socket.socket, notify_w: int, server: int, command: Command) -> int:
    """A spare child: wait for a connection, tell the server, serve it."""
    import signal

    from shimv2.libc import libc

    signal.set_wakeup_fd(-1)  # the server's: its SIGCHLDs, not ours
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's clean-up is not ours
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    # Waiting, we die with the server (it may be stopped, idle, or killed).
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != server:
        return 0
    fd, _ = listener._accept()  # type: ignore[attr-defined]  # the C socket: a bare fd
    # Serving, we outlive it: a stopped server never cuts a command short.
    libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
    conn = _socket.socket(fileno=fd)
    fresh = _unchanged(_files)
    os.write(notify_w, TOOK if fresh else OUT_OF_DATE)
    for server_fd in _server_fds:
        # A killed server's socket must stop accepting at once, and a new server
        # must get the lock, even while this child runs a long delete.
        if server_fd != notify_w:  # until we know whether we serve
            try:
                os.close(server_fd)
            except OSError:
                pass
    return _serve_connection(conn, fresh, notify_w, command)


def _serve_connection(conn: _socket.socket, fresh: bool, notify_w: int, command: Command) -> int:
    """In a spare child: check the caller and its request, then run the command
    (and tell the server it did: refused requests do not keep a server alive)."""
    creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    peer_pid, peer_uid, _ = struct.unpack("3i", creds)
    if peer_uid != os.geteuid():
        _log(f"refusing peer pid={peer_pid} uid={peer_uid}")
        return 0
    try:  # while it is open, the peer's pid cannot name another process
        peer_pidfd = conn.getsockopt(_socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        peer_pidfd = -1  # before Linux 6.5: the peer waits for our answer
    conn.settimeout(5.0)
    data, ancillary, msg_flags, _ = conn.recvmsg(MAX_REQUEST, _socket.CMSG_SPACE(4 * 8))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += struct.unpack(f"{usable // 4}i", payload[:usable])
    try:
        if not fresh:
            raise _Refused("the fork server is out of date")
        request = _check_request(data, fds, msg_flags)
        _check_peer(peer_pid, request)
        if peer_pidfd >= 0 and _exited(peer_pidfd):
            # It handed its socket on and exited: /proc/<pid> may be someone else now.
            raise _Refused("the caller is gone")
    except _Refused as exc:
        _log(f"refused pid={peer_pid}: {exc}")
        conn.send(b"refused " + str(exc).encode())
        return 0
    finally:
        if peer_pidfd >= 0:
            os.close(peer_pidfd)
    os.write(notify_w, SERVING)
    os.close(notify_w)
    _log(f"pid {peer_pid}: {' '.join(request['argv'][-1:])} runs in child {os.getpid()}")  # type: ignore[index]
    global _log_fd
    try:
        os.close(_log_fd)
    except OSError:
        pass
    _log_fd = -1  # from here on the caller's stderr (fd 2) is ours
    return _run_command(conn, request, fds, command)


def _exited(pidfd: int) -> bool:
    """A pidfd reads as readable once its process has exited."""
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _security_labels(proc: str = "/proc/self") -> tuple[str | None, ...]:
    labels: list[str | None] = []
    for name in SECURITY_LABELS:
        try:
            labels.append(_read(f"{proc}/{name}").strip("\0\n "))
        except OSError:
            labels.append(None)  # no such LSM
    return tuple(labels)


def _check_request(data: bytes, fds: list[int], msg_flags: int) -> dict[str, object]:
    import stat

    if msg_flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
        raise _Refused("request truncated")
    if len(fds) != PASSED_FDS:
        raise _Refused(f"want {PASSED_FDS} fds (stdin, stdout, stderr, cwd), got {len(fds)}")
    if not stat.S_ISDIR(os.fstat(fds[3]).st_mode):
        raise _Refused("the working directory fd is not a directory")
    fields = data.split(b"\0")
    if fields[0] != MAGIC:
        raise _Refused("protocol mismatch")
    if len(fields) < 3 or fields.pop() != b"" or not fields[1].isdigit():
        raise _Refused("bad request")
    argc = int(fields[1])
    if len(fields) < 2 + argc:
        raise _Refused("bad argv")
    argv = [os.fsdecode(arg) for arg in fields[2 : 2 + argc]]
    env = {}
    for entry in fields[2 + argc :]:
        key, sep, value = entry.partition(b"=")
        if sep and key:  # as Python builds os.environ
            env[os.fsdecode(key)] = os.fsdecode(value)
    return {"argv": argv, "env": env}


def _check_peer(pid: int, request: dict[str, object]) -> None:
    """What the child takes over must be what the peer is: namespaces, root,
    confinement, umask, rlimits and cgroups are read from the kernel
    (SO_PEERCRED's pid), never from the request. The peer waits for our answer,
    so its pid cannot be reused meanwhile."""
    import resource

    try:
        theirs = _namespaces(f"/proc/{pid}")
        status = _status_fields(f"/proc/{pid}/status")
        request["rlimits"] = {
            name: resource.prlimit(pid, getattr(resource, name))
            for name in RLIMITS
            if hasattr(resource, name)
        }
        request["cgroup"] = _read(f"/proc/{pid}/cgroup")
        request["umask"] = int(status["Umask"], 8)
        request["nice"] = os.getpriority(os.PRIO_PROCESS, pid)
        request["affinity"] = os.sched_getaffinity(pid)
    except (OSError, KeyError, ValueError) as exc:
        raise _Refused(f"cannot inspect the caller: {exc}") from exc
    if theirs != _own_namespaces:
        raise _Refused("the caller runs in other namespaces")
    if _security_labels(f"/proc/{pid}") != _own_labels:
        raise _Refused("the caller runs under another security label (AppArmor, SELinux)")
    for field in CONFINEMENT:
        if status.get(field) != _own_status.get(field):
            raise _Refused(f"the caller is confined differently ({field})")
    request["pid"] = pid
    request["ppid"] = int(status.get("PPid", "0"))


def _status_fields(path: str) -> dict[str, str]:
    fields = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _run_command(
    conn: _socket.socket, request: dict[str, object], fds: list[int], command: Command
) -> int:
    """Take over the caller's context and run its command; tell it the status."""
    answered = False
    try:
        conn.send(b"ack")  # from here on the command may run: no fallback
        from shimv2.flags import self_command

        argv = list(request["argv"])  # type: ignore[call-overload]
        launcher = self_command()  # the server's own launcher: what a direct run execs
        _set_argv([*launcher, *argv])  # not "forkserver": `pkill -f` misses it
        try:
            _adopt_context(request)
        except Exception as exc:  # CgroupError included: refuse, the caller runs it
            conn.send(f"refused cannot take over the caller's context: {exc}".encode())
            answered = True
            return 0
        handoff.caller_pid = int(request["pid"])  # type: ignore[call-overload]
        handoff.caller_ppid = int(request["ppid"])  # type: ignore[call-overload]
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.fchdir(fds[3])
        for fd in fds:
            os.close(fd)
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [launcher[-1], *argv]
        status = 1
        try:
            status = command(argv)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()  # to the caller's stderr, as a direct run would
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if status != 0:
            handoff.abandon_daemon()
        conn.send(f"exit {status}".encode())
        answered = True
    finally:
        if not answered:
            handoff.abandon_daemon()
            try:
                conn.send(b"exit 1")
            except OSError:
                pass
    conn.close()
    return _run_pending_daemon(command) if handoff.pending_daemon is not None else 0


def _adopt_context(request: dict[str, object]) -> None:
    """Session, rlimits, umask, nice value, CPU affinity and cgroups of the caller
    (containerd's unit may set Nice= or CPUAffinity= after the server started)."""
    import resource

    os.setsid()
    nice = request.get("nice")
    if isinstance(nice, int) and nice != os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # raising it needs CAP_SYS_NICE: else refused
    affinity = request.get("affinity")
    if isinstance(affinity, set) and affinity != os.sched_getaffinity(0):
        os.sched_setaffinity(0, affinity)
    limits = request.get("rlimits")
    if isinstance(limits, dict):
        for name, (soft, hard) in limits.items():
            if name in RLIMITS and hasattr(resource, name):
                which = getattr(resource, name)
                if resource.getrlimit(which) != (int(soft), int(hard)):
                    resource.setrlimit(which, (int(soft), int(hard)))
    os.umask(int(request.get("umask", 0o022)))  # type: ignore[call-overload]
    wanted = str(request.get("cgroup", ""))
    if wanted and wanted != _read("/proc/self/cgroup"):
        from shimv2.cgroups import join_cgroups

        join_cgroups(wanted)


def _run_pending_daemon(command: Command) -> int:
    """After a successful ``start`` answered its caller: serve as the daemon
    (``args`` carry no action: ``command`` runs the daemon)."""
    assert handoff.pending_daemon is not None
    args, listener_fd = handoff.pending_daemon
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # containerd reads start's output to EOF
        os.dup2(null, fd)
    os.dup2(listener_fd, 3)  # where the daemon expects its listener
    os.closerange(4, _max_fd())  # close_range(2): cheap up to any limit
    from shimv2.flags import self_command

    sys.argv = [self_command()[-1], *args]
    _set_argv([*self_command(), *args])  # what a spawned daemon shows
    return command(args)


def _max_fd() -> int:
    """Above any fd we can hold: the hard limit (the soft one was adopted)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if 0 < hard < 1 << 30 else 1 << 20


_argv_area: tuple[int, int] | None = None  # the argv area as exec'd (start, end)
# /proc/PID/stat fields (1-based) that PR_SET_MM_MAP takes; all but brk are there.
_MM_FIELDS = {
    "start_code": 26,
    "end_code": 27,
    "start_stack": 28,
    "start_data": 45,
    "end_data": 46,
    "start_brk": 47,
    "arg_start": 48,
    "arg_end": 49,
    "env_start": 50,
    "env_end": 51,
}
# The u64 fields of struct prctl_mm_map, in order.
_MM_ORDER = [
    "start_code",
    "end_code",
    "start_data",
    "end_data",
    "start_brk",
    "brk",
    "start_stack",
    "arg_start",
    "arg_end",
    "env_start",
    "env_end",
]
PR_SET_MM, PR_SET_MM_MAP = 35, 14
SYS_BRK = 12  # x86-64; elsewhere PR_SET_MM_MAP is not tried (see _set_argv)


def _mm_fields() -> dict[str, int]:
    fields = _read("/proc/self/stat").rsplit(")", 1)[1].split()  # fields[0] is field 3
    return {name: int(fields[n - 3]) for name, n in _MM_FIELDS.items()}


def _area() -> tuple[int, int]:
    """The argv area as exec'd: later calls may have shrunk what the kernel shows."""
    global _argv_area
    if _argv_area is None:
        mm = _mm_fields()
        _argv_area = (mm["arg_start"], mm["arg_end"])
    return _argv_area


def _set_cmdline(title: str) -> None:
    """Show ``title`` as this process's command line (ps, /proc/PID/cmdline),
    one string: the server's own, found by installers as " forkserver ".

    The kernel reads the command line from the original argv area; when its
    last byte is not NUL it returns the text up to the first NUL (the
    setproctitle(3) convention). ``launch`` left TITLE_ROOM bytes for this.
    """
    import ctypes

    try:
        start, end = _area()
    except (OSError, ValueError, IndexError):
        return
    size = end - start
    if size < 2:
        return
    encoded = title.encode()[: size - 2] + b"\0"
    ctypes.memmove(start, encoded + b" " * (size - len(encoded)), size)


def _set_argv(argv: list[str]) -> None:
    """Make /proc/PID/cmdline exactly ``argv``, NUL-separated, as if exec'd with it
    (pgrep -f, psutil and containerd's leak checks split it into arguments).

    The strings go into the argv area ``launch`` made room for; the kernel then
    shows [arg_start, arg_end), so arg_end must move to their end. prctl's
    PR_SET_MM_ARG_END needs CAP_SYS_RESOURCE, PR_SET_MM_MAP (checkpoint/restore)
    does not: it sets every field of the memory map at once, all but arg_end
    as they are. Without it the rest of the area is NULs (empty trailing
    arguments; ``argv`` itself is intact).
    """
    import ctypes
    import platform

    try:
        start, end = _area()
        mm = _mm_fields()
    except (OSError, ValueError, IndexError):
        return
    if end - start < 2:
        return
    encoded = b"".join(os.fsencode(arg) + b"\0" for arg in argv)[: end - start]
    encoded = encoded[:-1] + b"\0"
    ctypes.memmove(start, encoded.ljust(end - start, b"\0"), end - start)
    if platform.machine() != "x86_64":
        return

    class MMMap(ctypes.Structure):  # struct prctl_mm_map, <linux/prctl.h>
        _fields_ = [
            *((name, ctypes.c_uint64) for name in _MM_ORDER),
            ("auxv", ctypes.c_uint64),
            ("auxv_size", ctypes.c_uint32),
            ("exe_fd", ctypes.c_uint32),
        ]

    mm_map = MMMap(**{**mm, "arg_start": start, "arg_end": start + len(encoded)})
    mm_map.exe_fd = 0xFFFFFFFF  # -1: keep /proc/PID/exe
    libc = ctypes.CDLL(None, use_errno=True)
    syscall, prctl = libc.syscall, libc.prctl
    syscall.restype = ctypes.c_long
    ref, size = ctypes.byref(mm_map), ctypes.sizeof(mm_map)
    # brk is set too: read it last, with nothing in between that could move it
    # (small objects come from pymalloc's mmap'd arenas, never the brk heap).
    mm_map.brk = syscall(SYS_BRK, 0)
    prctl(PR_SET_MM, PR_SET_MM_MAP, ref, size, 0)


def main(argv: list[str], command: Command, preload: Callable[[], None]) -> int:
    """``containerd-shim-pyshim-v2 forkserver TAG`` (launched by ``start``): serve
    ``command`` (cli's, run in a child per request) after ``preload``."""
    if not argv:
        sys.stderr.write("usage: containerd-shim-pyshim-v2 forkserver TAG\n")
        return 2
    try:
        return serve(argv[0], command, preload)
    except OSError as exc:
        _log(f"fork server failed: {exc}")
        return 1
