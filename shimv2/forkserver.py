"""A per-node fork server: ``start``, ``delete`` and the daemon without Python's
start-up cost.

containerd runs the shim binary for every ``start`` and every ``delete``, and a
fresh interpreter needs ~130 ms and ~20 MiB of private memory to import trio,
protobuf and the shim before a daemon can serve. The fork server pays that
once: it imports everything, ``gc.freeze()``s the heap and waits on a
root-only socket. The binary (run by the launcher with ``python -I -S``, see
shimv2.launcher) then only imports this module's client half: it sends its
command line, environment and stdin/stdout/stderr/working directory over
SCM_RIGHTS; the server forks a child that adopts the caller's session, cgroups,
rlimits and umask, runs the very same ``cli.main`` the caller would have run,
and answers with its exit status. A daemon that ``start`` needs is forked from
that warm child (no exec, no imports) and shares the frozen pages
copy-on-write with its siblings; the child exits, so the daemon is re-parented
to init exactly like a directly started one.

Rules that keep it safe:

- Nothing depends on it: when no server answers, the binary runs the command
  itself (and ``start`` launches a server in the background for next time).
  Running shims never talk to it; killing it breaks nothing.
  ``PYSHIM_FORKSERVER=0`` turns it off.
- One version per server: the socket is named after a digest of the
  interpreter and every source file of this package, so a new pyshim (or an
  edited checkout) never runs in an old server; a server whose files changed,
  or that stayed idle, exits by itself.
- Root-only: the directory is 0700, the socket 0600, and a peer whose uid is
  not ours is refused.
- The child must be what a direct run would be. What it cannot take over
  (other namespaces or root, a higher hard rlimit) makes the server refuse
  before anything ran, and the caller runs the command itself.
"""

from __future__ import annotations

import _socket
import marshal
import os
import struct
import sys
import time

DEFAULT_DIR = "/run/pyshim"
DIR_ENV = "PYSHIM_FORKSERVER_DIR"
ENABLE_ENV = "PYSHIM_FORKSERVER"  # "0" / "off" / "false": never use a fork server
IDLE_ENV = "PYSHIM_FORKSERVER_IDLE"  # seconds without a request before it exits
DEFAULT_IDLE = 600.0
PROTOCOL = 2
MAX_REQUEST = 1 << 20
# The caller's stdin, stdout, stderr and working directory, in this order.
PASSED_FDS = 4
NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup")
# /proc/PID/status fields that must match: a confined caller stays confined.
CONFINEMENT = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")
# rlimits the child takes over from the caller (containerd's own limits).
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
# Room in the server's own argv area for a daemon's command line (_set_cmdline).
TITLE_ROOM = 2048
LOG_LIMIT = 1 << 20

#: Set in a child of the fork server: the pid of the process that asked and of
#: its parent (containerd); ``start`` then forks its daemon instead of spawning it.
caller_pid = 0
caller_ppid = 0


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


def version_tag(package: str = "") -> str:
    """Digest of the interpreter and of every source file of this package (path,
    size, mtime): any upgrade or edit gives a new server."""
    digest = _sha256()(f"{PROTOCOL}\0{os.path.realpath(sys.executable)}\0{sys.version}".encode())
    package = package or os.path.dirname(os.path.realpath(__file__))
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".so")):
                path = os.path.join(root, name)
                st = os.stat(path)
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return str(digest.hexdigest()[:20])


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
        except OSError as exc:
            raise Unavailable(f"no fork server at {path}: {exc}") from exc
        import resource

        from shimv2.cli import self_command

        request = {
            "protocol": PROTOCOL,
            "argv": argv,
            "command": self_command(),
            "env": dict(environ),
            "umask": _umask(),
            "rlimits": {
                name: resource.getrlimit(getattr(resource, name))
                for name in RLIMITS
                if hasattr(resource, name)
            },
            "cgroup": _read("/proc/self/cgroup"),
        }
        cwd_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds = struct.pack("4i", 0, 1, 2, cwd_fd)
        try:
            conn.sendmsg([marshal.dumps(request)], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
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
    from shimv2.cli import self_command

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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- server ----------------------------------------------------------------------

_log_fd = -1
_server_fds: list[int] = []  # listener and lock: children close them at once


class _Refused(Exception):
    """Answered as ``refused``; nothing ran."""


def serve(tag: str) -> int:
    """Run the fork server for ``tag`` until it is idle or out of date."""
    import fcntl
    import gc
    import stat

    directory = server_dir(os.environ)
    sock_path, lock_path, log_path, pid_path = paths(directory, tag)
    if tag != version_tag():
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
    _preload()
    listener = _bind(sock_path)
    _server_fds[:] = [listener.fileno(), lock_fd]
    bound = os.stat(sock_path).st_ino  # fstat of a socket names sockfs, not the path
    with open(pid_path, "w") as f:
        f.write(str(os.getpid()))
    idle = float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE)
    # with the release's path, so that installers find (and stop) an old one
    _set_cmdline(f"{os.path.realpath(sys.argv[0])} forkserver {tag}")
    gc.collect()
    gc.freeze()  # the collector never touches (so never copies) these pages again
    _log(f"serving {sock_path} (pid {os.getpid()}, idle timeout {idle:.0f}s)")
    import signal

    # SIGTERM (installers stopping an old release) cleans up like an idle exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _accept_loop(listener, sock_path, bound, tag, idle)
    finally:
        try:
            if os.stat(sock_path).st_ino == bound:
                for path in (sock_path, pid_path, log_path, lock_path):
                    os.unlink(path)
        except OSError:
            pass
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


def _preload() -> None:
    """Everything the commands and the daemon import, also lazily."""
    import trio

    import shimv2.cgroups
    import shimv2.console
    import shimv2.daemon
    import shimv2.manager
    import shimv2.mount
    import shimv2.options
    import shimv2.runc
    import shimv2.runccmd
    import shimv2.stdio  # noqa: F401
    from shimv2.api.containerd.task.v2 import shim_pb2  # noqa: F401

    # One empty event loop: trio's lazily built state then lives in the shared,
    # frozen pages instead of being built again (privately) by every daemon.
    trio.run(trio.sleep, 0)


def _bind(path: str) -> _socket.socket:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    listener.bind(tmp)
    os.chmod(tmp, 0o600)
    listener.listen(64)
    os.rename(tmp, path)  # appears only once it accepts
    return listener


def _accept_loop(listener: _socket.socket, path: str, inode: int, tag: str, idle: float) -> None:
    listener.settimeout(min(5.0, idle))
    last_request = time.monotonic()
    while True:
        _reap()
        try:
            fd, _ = listener._accept()  # type: ignore[attr-defined]  # the C socket: a bare fd
        except TimeoutError:
            if time.monotonic() - last_request >= idle:
                _log("idle: exiting")
                return
            if not _still_current(path, inode, tag):
                _log("out of date or replaced: exiting")
                return
            continue
        last_request = time.monotonic()
        conn = _socket.socket(fileno=fd)
        try:
            _handle(conn)
        except Exception as exc:  # one bad request never takes the server down
            _log(f"request failed: {exc!r}")
        finally:
            conn.close()


def _reap() -> None:
    """Collect finished children (each lives as long as one command)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _still_current(path: str, inode: int, tag: str) -> bool:
    """Our socket is still the one at ``path`` and our files did not change."""
    try:
        if os.stat(path).st_ino != inode:
            return False
        return version_tag() == tag
    except OSError:
        return False


def _handle(conn: _socket.socket) -> None:
    creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    peer_pid, peer_uid, _ = struct.unpack("3i", creds)
    if peer_uid != os.geteuid():
        _log(f"refusing peer pid={peer_pid} uid={peer_uid}")
        return
    conn.settimeout(5.0)
    data, ancillary, msg_flags, _ = conn.recvmsg(MAX_REQUEST, _socket.CMSG_SPACE(4 * 8))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += struct.unpack(f"{usable // 4}i", payload[:usable])
    try:
        try:
            request = _check_request(data, fds, msg_flags)
            _check_peer(peer_pid, request)
        except _Refused as exc:
            _log(f"refused pid={peer_pid}: {exc}")
            conn.send(b"refused " + str(exc).encode())
            return
        child = _run_child(conn, request, fds)
        _log(f"pid {peer_pid}: {' '.join(request['argv'][-1:])} runs in child {child}")  # type: ignore[index]
    finally:
        for fd in fds:
            os.close(fd)


def _check_request(data: bytes, fds: list[int], msg_flags: int) -> dict[str, object]:
    import stat

    if msg_flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
        raise _Refused("request truncated")
    if len(fds) != PASSED_FDS:
        raise _Refused(f"want {PASSED_FDS} fds (stdin, stdout, stderr, cwd), got {len(fds)}")
    if not stat.S_ISDIR(os.fstat(fds[3]).st_mode):
        raise _Refused("the working directory fd is not a directory")
    try:
        request = marshal.loads(data)  # from a root peer (checked above), never others
    except (ValueError, EOFError, TypeError, MemoryError) as exc:
        raise _Refused(f"bad request: {exc!r}") from exc
    if not isinstance(request, dict) or request.get("protocol") != PROTOCOL:
        raise _Refused("protocol mismatch")
    if not _strings(request.get("argv")) or not _strings(request.get("command")):
        raise _Refused("bad argv")
    env = request.get("env")
    if not isinstance(env, dict) or not _strings(list(env) + list(env.values())):
        raise _Refused("bad environment")
    return request


def _check_peer(pid: int, request: dict[str, object]) -> None:
    """What the child takes over must be what the peer is: namespaces, root and
    confinement are read from the kernel (SO_PEERCRED's pid), never from the
    request. The peer waits for our answer, so its pid cannot be reused meanwhile."""
    try:
        theirs = _namespaces(f"/proc/{pid}")
        status = _status_fields(f"/proc/{pid}/status")
    except OSError as exc:
        raise _Refused(f"cannot inspect the caller: {exc}") from exc
    if theirs != _namespaces():
        raise _Refused("the caller runs in other namespaces")
    mine = _status_fields("/proc/self/status")
    for field in CONFINEMENT:
        if status.get(field) != mine.get(field):
            raise _Refused(f"the caller is confined differently ({field})")
    request["pid"] = pid
    request["ppid"] = int(status.get("PPid", "0"))


def _status_fields(path: str) -> dict[str, str]:
    fields = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and "\0" not in v for v in value)


def _run_child(conn: _socket.socket, request: dict[str, object], fds: list[int]) -> int:
    """Fork the child that takes over the caller's context and runs its command."""
    import signal

    # A SIGTERM between fork and the reset below would run the server's clean-up
    # in the child (removing the live server's files): hold it until then.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    child = os.fork()
    if child != 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return child  # reaped by the accept loop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's clean-up is not ours
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    for fd in (*_server_fds, _log_fd):
        # A killed server's socket must stop accepting at once, and a new server
        # must get the lock, even while this child runs a long delete.
        try:
            os.close(fd)
        except OSError:
            pass
    answered = False
    try:
        conn.send(b"ack")  # from here on the command may run: no fallback
        argv = list(request["argv"])  # type: ignore[call-overload]
        command = list(request["command"])  # type: ignore[call-overload]
        _set_cmdline(" ".join([*command, *argv]))  # not "forkserver": `pkill -f` misses it
        try:
            _adopt_context(request)
        except Exception as exc:  # CgroupError included: refuse, the caller runs it
            conn.send(f"refused cannot take over the caller's context: {exc}".encode())
            answered = True
            return 0  # (never returns: the finally clause exits)
        global caller_pid, caller_ppid
        caller_pid = int(request["pid"])  # type: ignore[call-overload]
        caller_ppid = int(request["ppid"])  # type: ignore[call-overload]
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.fchdir(fds[3])
        for fd in fds:
            os.close(fd)
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [command[-1], *argv]
        from shimv2.cli import main

        status = 1
        try:
            status = main(argv, local=True)
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
        conn.send(f"exit {status}".encode())
        answered = True
    finally:
        if not answered:
            try:
                conn.send(b"exit 1")
            except OSError:
                pass
        os._exit(0)


def _adopt_context(request: dict[str, object]) -> None:
    """Session, rlimits, umask and cgroups of the caller."""
    import resource

    os.setsid()
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


def fork_daemon(args: list[str], listener_fd: int) -> int:
    """In a child of the server: fork the shim daemon itself (nothing to import)."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        os.setpgid(0, 0)  # its own process group, as a spawned daemon gets
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.dup2(listener_fd, 3)  # where the daemon expects its listener
        os.closerange(4, _max_fd())  # close_range(2): cheap up to any limit
        import random

        random.seed()
        from shimv2.cli import parse_flags, self_command
        from shimv2.daemon import run as run_daemon

        sys.argv = [self_command()[-1], *args]
        _set_cmdline(" ".join([*self_command(), *args]))  # what a spawned daemon shows
        status = run_daemon(parse_flags(args))
    except BaseException:
        pass
    finally:
        os._exit(status)


def _max_fd() -> int:
    """Above any fd we can hold: the hard limit (the soft one was adopted)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if 0 < hard < 1 << 30 else 1 << 20


def _set_cmdline(title: str) -> None:
    """Show ``title`` as this process's command line (ps, /proc/PID/cmdline).

    The kernel reads the command line from the original argv area; when its
    last byte is not NUL it returns the text up to the first NUL (the
    setproctitle(3) convention). ``launch`` left TITLE_ROOM bytes for this.
    """
    import ctypes

    try:
        fields = _read("/proc/self/stat").rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (stat 48, 49)
    except (OSError, ValueError, IndexError):
        return
    size = end - start
    if size < 2:
        return
    encoded = title.encode()[: size - 2] + b"\0"
    ctypes.memmove(start, encoded + b" " * (size - len(encoded)), size)


def main(argv: list[str]) -> int:
    """``containerd-shim-pyshim-v2 forkserver TAG`` (launched by ``start``)."""
    if not argv:
        sys.stderr.write("usage: containerd-shim-pyshim-v2 forkserver TAG\n")
        return 2
    try:
        return serve(argv[0])
    except OSError as exc:
        _log(f"fork server failed: {exc}")
        return 1
