"""The binary contract: ``start``, ``delete`` and ``-info`` (spec: shim-contract.md §4, §6).

``start`` runs on containerd's critical path and must return in milliseconds:
it imports neither trio nor protobuf. It binds the shim socket, forks the
daemon with the listener as fd 3, writes ``address`` and ``shim.pid`` into the
bundle and prints the address. stdout and stderr are one pipe that containerd
reads to EOF and uses verbatim, so nothing else may be written there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import stat
import sys
import time

from shimv2 import bundle as bundlefiles
from shimv2 import handoff, protowire
from shimv2.bootstrap import bootstrap_result, classify
from shimv2.flags import Flags, self_command

SOCKET_DIR = "/run/containerd/s"
# Annotations that put several containers into one shim (first present wins).
GROUP_ANNOTATIONS = (
    "io.containerd.pyshim.v2.group",
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
)
_UNIX_PREFIX = "unix://"
# As the Go shim (net.Listen takes somaxconn, 4096): a burst of connects queues
# instead of failing with EAGAIN.
LISTEN_BACKLOG = 4096


class StartError(Exception):
    pass


def group_id(bundle: str, container_id: str) -> str:
    """The id a shim socket is named after: a pod's sandbox id, or the container's own."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            annotations = json.load(f).get("annotations") or {}
    except (OSError, ValueError):
        return container_id
    for key in GROUP_ANNOTATIONS:
        value = annotations.get(key)
        if value:
            return str(value)
    return container_id


def socket_path(address: str, namespace: str, group: str, directory: str = "") -> str:
    """``<dir>/<sha256(join(address, ns, group))>`` exactly as containerd names it;
    ``dir`` is /run/containerd/s unless containerd 2.3 said otherwise."""
    joined = os.path.normpath(os.path.join(address, namespace, group))
    return os.path.join(directory or SOCKET_DIR, hashlib.sha256(joined.encode()).hexdigest())


def _serving(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_socket(path: str) -> socket.socket | None:
    """Listen on ``path``; None when a live shim already serves it (grouped containers)."""
    os.makedirs(SOCKET_DIR, mode=0o600, exist_ok=True)  # as containerd's shims; root traverses it
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            if _serving(path):
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale socket of a dead shim
            continue
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
        return sock
    raise StartError(f"socket {path} is in use")


def _daemon_args(flags: Flags) -> list[str]:
    args = ["-namespace", flags.namespace, "-id", flags.id, "-address", flags.address]
    if flags.debug:
        args.append("-debug")
    return args


def _spawn_direct(args: list[str], listener: socket.socket) -> int:
    """A fresh interpreter running the daemon (pays Python's start-up; see forkserver)."""
    argv = [*self_command(), *args]
    # The daemon gets /dev/null for stdio (containerd reads start's pipe to EOF)
    # and the listening socket as fd 3; every other fd is close-on-exec.
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
    ]
    return os.posix_spawn(
        sys.executable,
        argv,
        dict(os.environ),
        file_actions=actions,
        setpgroup=0,
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


def _spawn_daemon(flags: Flags, listener: socket.socket) -> int:
    """In a fork server's child (everything imported) that child becomes the
    daemon once we answered; else spawn a fresh interpreter."""
    args = _daemon_args(flags)
    if handoff.caller_pid:
        return handoff.become_daemon(args, listener.fileno())
    return _spawn_direct(args, listener)


def _adjust_oom_score(pid: int) -> None:
    """containerd's oom_score_adj + 1, so the kernel kills the shim before containerd."""
    parent = handoff.caller_ppid or os.getppid()  # containerd ran the shim binary
    try:
        with open(f"/proc/{parent}/oom_score_adj") as f:
            score = min(int(f.read().strip()) + 1, 1000)
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))
    except (OSError, ValueError):
        pass  # unprivileged or containerd gone: the Go shim ignores this too


def _read_stdin() -> bytes:
    try:
        return sys.stdin.buffer.read()
    except (OSError, AttributeError):
        return b""


def _shim_cgroup(options: bytes) -> str:
    """The cgroup the daemon goes into; options we cannot read name none (Create
    reports bad options properly, and start must never fail on an unknown type)."""
    if not options:
        return ""
    from shimv2.options import shim_cgroup_from_any

    try:
        return shim_cgroup_from_any(options)
    except (ValueError, OSError):
        return ""


def _create_sched_core_cookie() -> None:
    """SCHED_CORE: a core-scheduling cookie for our process group, which the daemon
    and through it every container process inherit (containerd's sched_core)."""
    import ctypes

    pr_sched_core, pr_sched_core_create, pidtype_pgid = 62, 1, 2
    from shimv2.libc import libc

    if libc.prctl(pr_sched_core, pr_sched_core_create, 0, pidtype_pgid, 0) != 0:
        err = ctypes.get_errno()
        raise StartError(f"enable sched core support: {os.strerror(err)}")


def start(flags: Flags) -> int:
    if not flags.namespace:
        sys.stderr.write("shim namespace cannot be empty\n")
        return 1
    if not flags.id:
        sys.stderr.write("shim id cannot be empty\n")
        return 1
    bundle = os.getcwd()
    given = classify(_read_stdin(), flags.id, flags.namespace)
    flags.debug = flags.debug or given.debug
    # The runtime options arrive again with Create; start only needs the shim cgroup.
    shim_cgroup = _shim_cgroup(given.options)
    group = group_id(bundle, flags.id)
    path = socket_path(flags.address, flags.namespace, group, given.socket_dir)
    address = _UNIX_PREFIX + path
    pid = 0
    listener: socket.socket | None = None
    try:
        if given.socket_dir:  # containerd 2.3 created it; make sure, then remember it
            os.makedirs(given.socket_dir, mode=0o700, exist_ok=True)
            _remember_socket_dir(bundle, given.socket_dir)
        listener = bind_socket(path)
        if listener is not None:
            if os.environ.get("SCHED_CORE"):
                _create_sched_core_cookie()
            pid = _spawn_daemon(flags, listener)
            _adjust_oom_score(pid)
            listener.close()
            if shim_cgroup:
                from shimv2.cgroups import move_to_cgroup

                move_to_cgroup(pid, shim_cgroup)
            bundlefiles.write_atomic(os.path.join(bundle, "shim.pid"), str(pid))
        bundlefiles.write_atomic(os.path.join(bundle, "address"), address)
    except Exception as exc:
        if pid == os.getpid():
            handoff.abandon_daemon()
        elif pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if listener is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        sys.stderr.write(f"failed to start shim: {exc}\n")
        return 1
    # 2.3 (BootstrapParams seen) gets a BootstrapResult; every older version a plain address.
    os.write(1, bootstrap_result(address) if given.bootstrap else address.encode())
    return 0


# -- delete -------------------------------------------------------------------


SOCKET_DIR_LINK = "s"  # <bundle>/s -> the socket dir containerd 2.3 chose (as the runc shim)


def _remember_socket_dir(bundle: str, directory: str) -> None:
    """``delete`` gets no BootstrapParams: it finds a non-default socket dir here."""
    link = os.path.join(bundle, SOCKET_DIR_LINK)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    os.symlink(directory, link)


def _socket_dirs(bundle: str) -> set[str]:
    """Where ``delete`` may remove a dead shim's socket: the default dir, or 2.3's."""
    dirs = {SOCKET_DIR}
    link = os.path.join(bundle, SOCKET_DIR_LINK)
    if os.path.islink(link):
        dirs.add(os.path.normpath(os.readlink(link)))
    return dirs


DEBUG_SOCKET_SUFFIX = ".debug"


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove_dead_socket(bundle: str) -> None:
    """Remove the shim socket when no daemon serves it any more (a grouped one may)."""
    address = bundlefiles.read_text(os.path.join(bundle, "address"))
    if not address or not address.startswith(_UNIX_PREFIX):
        return
    path = address[len(_UNIX_PREFIX) :]
    in_our_dir = os.path.dirname(os.path.normpath(path)) in _socket_dirs(bundle)
    if in_our_dir and _is_socket(path) and not _serving(path):
        # and the dead daemon's debug socket (debug.SOCKET_SUFFIX; not imported:
        # delete stays import-light)
        for dead in (path, path + DEBUG_SOCKET_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(dead)


def delete(flags: Flags) -> int:
    """Clean up after a shim that containerd can no longer reach; idempotent.

    containerd runs this after every shim exit, on the path of ``ctr run --rm``
    and of every pod teardown: it imports no protobuf, and skips runc when runc
    holds no state for the container any more.
    """
    from shimv2.mount import unmount_all
    from shimv2.runccmd import runc_delete_force_sync

    bundle = flags.bundle or os.getcwd()
    exit_info = None
    lock_fd = -1
    with contextlib.suppress(OSError):
        lock_fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # two concurrent deletes run one after the other
    try:
        options = bundlefiles.read_runc_options(bundle)
        if os.path.lexists(os.path.join(options.runc_root(flags.namespace), flags.id)):
            warning = runc_delete_force_sync(options, flags.namespace, bundle, flags.id)
            if warning:
                sys.stderr.write(warning + "\n")
        try:
            unmount_all(os.path.join(bundle, "rootfs"))
        except OSError as exc:
            sys.stderr.write(f"{exc}\n")
        _remove_dead_socket(bundle)
        exit_info = bundlefiles.read_exit(bundle)
        if exit_info is None:
            # init.exit.json could not be written (full disk): the event journal may
            # still hold the init's /tasks/exit (issue 5; see shimv2/journal.py).
            from shimv2.journal import read_init_exit

            exit_info = read_init_exit(bundle, flags.id)
        pid = bundlefiles.read_pid(os.path.join(bundle, "init.pid"))
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
    if exit_info is not None:
        status, exited_at_ns = exit_info.status, exit_info.exited_at_ns
    else:
        status, exited_at_ns = 128 + signal.SIGKILL, time.time_ns()
    sys.stdout.buffer.write(delete_response(max(pid, 0), status, exited_at_ns))
    sys.stdout.flush()
    return 0


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """``containerd.task.v2.DeleteResponse`` {pid=1, exit_status=2, exited_at=3},
    encoded by hand as protobuf would (zero fields left out)."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    timestamp = protowire.encode([(n, v) for n, v in ((1, seconds), (2, nanos)) if v])
    fields: list[tuple[int, int | bytes | str]] = [(1, pid), (2, exit_status)]
    return protowire.encode([(n, v) for n, v in fields if v] + [(3, timestamp)])


RUNTIME_NAME = "io.containerd.pyshim.v2"
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"


def info() -> int:
    """``-info`` (containerd 2.x): a ``RuntimeInfo`` on stdout; never starts a daemon.

    stdin holds the options (a bare Any) or nothing; they are echoed back, and
    pick the runc whose ``features`` (JSON) we pass on, as the runc shim does.
    """
    import subprocess

    from google.protobuf import any_pb2
    from google.protobuf.message import DecodeError

    from shimv2 import __version__
    from shimv2.api.containerd.types import introspection_pb2
    from shimv2.options import from_any

    raw = _read_stdin()
    answer = introspection_pb2.RuntimeInfo(name=RUNTIME_NAME)
    answer.version.version = __version__
    runc = "runc"
    if raw:
        try:
            options = any_pb2.Any.FromString(raw)
            runc = from_any(options.type_url, options.value).runc_binary
        except (DecodeError, ValueError) as exc:
            sys.stderr.write(f"cannot read the runtime options: {exc}\n")
            return 1
        answer.options.CopyFrom(options)
    try:
        features = subprocess.run(
            [runc, "features"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        features = None
    if features is not None and features.returncode == 0 and features.stdout.strip():
        answer.features.CopyFrom(any_pb2.Any(type_url=FEATURES_TYPE_URL, value=features.stdout))
    sys.stdout.buffer.write(answer.SerializeToString())
    sys.stdout.flush()
    return 0
