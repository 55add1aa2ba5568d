"""A private containerd: own root, state, sockets, config and namespace.

Every `PrivateContainerd` gets its own temp dir (``<base>/<prefix>XXXX``)
holding its config, root, state, gRPC + ttrpc sockets and log file, and its own
namespace, so it never touches the system containerd
(``/run/containerd/containerd.sock``) or other instances on the machine. The
shim binaries are found through the ``PATH`` we give containerd: a caller-chosen
list of directories first (the venv's bin dir by default: that is where
``pip install -e .`` puts ``containerd-shim-pyshim-v2``), then the system dirs
(``containerd-shim-runc-v2``, ``runc``).

Two paths are compiled into containerd/the shims and therefore shared with every
other containerd on the machine: the shim sockets in ``/run/containerd/s`` and
the runc state root ``/run/containerd/runc/<ns>``. Our namespace is unique and
our socket names are hashes of our own gRPC address, so there are no clashes;
cleanup only ever touches entries derived from our address/namespace, and only
kills processes whose command line carries ``-address <our socket>``.

Used by the end-to-end tests (``tests/e2e/harness.py`` builds on it), the demo,
the benchmarks and the stress tool (``python -m shimv2.tools.stress``). Needs root,
containerd, ctr, runc and a static busybox (for `busybox_rootfs`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "CREATED",
    "CTR_TIMEOUT",
    "PAUSED",
    "REQUIRED_APPLETS",
    "REQUIRED_TOOLS",
    "RUNC_STATE_ROOT",
    "RUNNING",
    "RUNTIMES",
    "SHIM_SOCKET_DIR",
    "STATUS_NUMBERS",
    "STOPPED",
    "ContainerdError",
    "Event",
    "EventWatcher",
    "PrivateContainerd",
    "busybox_rootfs",
    "containerd_version",
    "default_path",
    "exit_code_from_task_rm",
    "has_flag",
    "kill_and_wait",
    "missing_tools",
    "mounts_under",
    "parse_event_line",
    "pid_alive",
    "process_alive",
    "require_tools",
    "shim_binary_name",
    "system_path",
    "unmount_all_under",
    "venv_bin_dir",
    "wait_until",
    "which",
]

# runtime type -> short id (test ids, benchmark columns)
RUNTIMES: dict[str, str] = {
    "go": "io.containerd.runc.v2",
    "pyshim": "io.containerd.pyshim.v2",
}

#: compiled-in socket dir of runtime-v2 shims (independent of containerd --state)
SHIM_SOCKET_DIR = Path("/run/containerd/s")
#: runc state root used by the runc shims: <root>/<namespace>/<id>
RUNC_STATE_ROOT = Path("/run/containerd/runc")

#: default timeout (s) for one ctr invocation; nothing here waits forever
CTR_TIMEOUT = 30.0
#: where containerd, ctr, runc, busybox and the Go shim are looked up by default
DEFAULT_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REQUIRED_TOOLS = ("containerd", "ctr", "runc", "busybox")

# task states as printed by `ctr task ls`
RUNNING = "RUNNING"
STOPPED = "STOPPED"
CREATED = "CREATED"
PAUSED = "PAUSED"

# containerd.task.v1.Status enum as printed by `ctr shim state` (a number)
STATUS_NUMBERS = {"UNKNOWN": 0, CREATED: 1, RUNNING: 2, STOPPED: 3, PAUSED: 4, "PAUSING": 5}


class ContainerdError(RuntimeError):
    """The private containerd could not do its job (missing tool, timeout, daemon died)."""


# --------------------------------------------------------------------------- tools


def shim_binary_name(runtime: str) -> str:
    """``io.containerd.pyshim.v2`` -> ``containerd-shim-pyshim-v2`` (containerd's rule)."""
    parts = runtime.split(".")
    if len(parts) < 2:
        raise ValueError(f"invalid runtime name {runtime!r}")
    return f"containerd-shim-{parts[-2]}-{parts[-1]}"


def system_path() -> str:
    """System dirs for containerd, ctr, runc, busybox (``PYSHIM_E2E_PATH`` overrides).

    ``PYSHIM_E2E_CONTAINERD`` names a directory holding another build of
    ``containerd``, ``ctr`` and ``containerd-shim-runc-v2``; it goes first, so
    the tests and the stress tool run against that containerd and its Go shim.
    """
    path = os.environ.get("PYSHIM_E2E_PATH", DEFAULT_SYSTEM_PATH)
    build = os.environ.get("PYSHIM_E2E_CONTAINERD")
    return f"{build}:{path}" if build else path


@functools.cache
def containerd_version(binary: str) -> tuple[int, int, int]:
    """(major, minor, patch) that ``containerd --version`` reports; (0, 0, 0) if unknown.

    Debian's package prints ``containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1``,
    a release build ``containerd github.com/containerd/containerd/v2 v2.2.7 <commit>``.
    """
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return (0, 0, 0)
    m = re.search(r"\sv?(\d+)\.(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2]), int(m[3])) if m else (0, 0, 0)


def venv_bin_dir() -> Path:
    """Directory of the running interpreter (not resolved: a venv's python is a symlink)."""
    return Path(sys.executable).parent


def default_path(first: Iterable[str | os.PathLike[str]] | None = None) -> str:
    """The PATH containerd (and therefore every shim) gets: *first* (default: the
    venv's bin dir), then `system_path`."""
    dirs = [str(venv_bin_dir())] if first is None else [str(d) for d in first]
    return ":".join([*dirs, system_path()])


def which(tool: str, path: str | None = None) -> str | None:
    return shutil.which(tool, path=path if path is not None else default_path())


def missing_tools(tools: Iterable[str] = REQUIRED_TOOLS, path: str | None = None) -> list[str]:
    return [t for t in tools if which(t, path) is None]


def require_tools(tools: Iterable[str] = REQUIRED_TOOLS, path: str | None = None) -> None:
    """Raise `ContainerdError` with an actionable message if a tool is missing or we
    are not root."""
    path = path if path is not None else default_path()
    problems = []
    missing = missing_tools(tools, path)
    if missing:
        problems.append(
            f"missing required tool(s): {', '.join(missing)} (searched PATH={path}); "
            "install them with `sudo scripts/install-deps.sh` "
            "(Debian: apt-get install containerd runc busybox-static)"
        )
    if os.geteuid() != 0:
        problems.append("a private containerd must run as root (containerd and runc need it)")
    if problems:
        raise ContainerdError("; ".join(problems))


# --------------------------------------------------------------------------- rootfs

#: applets we need at the very least (all of busybox's applets get linked anyway)
REQUIRED_APPLETS = (
    "sh", "sleep", "cat", "echo", "true", "false", "ls", "ps", "stty", "printf", "head",
    "dd", "yes", "kill", "wc", "env", "id", "seq", "tail", "grep", "mkdir", "rm", "touch",
    "date", "tr", "hostname", "mount", "readlink", "test", "[",
)  # fmt: skip


def busybox_rootfs(
    dest: str | os.PathLike[str], busybox: str | None = None, path: str | None = None
) -> Path:
    """Build a minimal rootfs in *dest* from the statically linked busybox.

    ``ctr run --rootfs DIR`` uses DIR itself as the container root (spec
    ``root.path``, writable unless ``--read-only``); runc mounts /proc, /dev,
    /sys... inside the container's mount namespace, so only the mount points
    need to exist here.
    """
    root = Path(dest)
    src = busybox or which("busybox", path)
    if src is None:
        raise ContainerdError("busybox not found; install busybox-static")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc",
              "root", "run", "var/tmp", "home"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    bb = root / "bin" / "busybox"
    if not bb.exists():
        shutil.copy2(src, bb)
        bb.chmod(0o755)
    out = subprocess.run([str(bb), "--list"], capture_output=True, text=True, timeout=10)
    applets = set(out.stdout.split()) | set(REQUIRED_APPLETS)
    applets.discard("busybox")
    for applet in sorted(applets):
        link = root / "bin" / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc" / "hostname").write_text("e2e\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    return root


# --------------------------------------------------------------------------- processes


def has_flag(cmdline: Sequence[str], flag: str, value: str) -> bool:
    """Go-style single-dash flag ``-flag value`` / ``-flag=value`` present in *cmdline*.

    Only the single-dash spelling containerd uses for shims counts: ``ctr``
    itself is run with ``--address`` and must not be mistaken for a shim.
    """
    for i, arg in enumerate(cmdline):
        if arg == flag and i + 1 < len(cmdline) and cmdline[i + 1] == value:
            return True
        if arg == f"{flag}={value}":
            return True
    return False


def process_alive(p: psutil.Process) -> bool:
    """*p* still runs (zombies count as gone)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie (zombies count as gone)."""
    try:
        return process_alive(psutil.Process(pid))
    except psutil.Error:
        return False


def kill_and_wait(procs: Iterable[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """SIGKILL *procs* and wait until they are gone or zombies; returns survivors."""
    procs = list(procs)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    deadline = time.monotonic() + timeout
    while True:
        survivors = [p for p in procs if process_alive(p)]
        if not survivors or time.monotonic() > deadline:
            return survivors
        time.sleep(0.05)


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll *predicate* until it returns a truthy value; raise `ContainerdError` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ContainerdError(f"timed out after {timeout:.1f}s waiting for {what or predicate}")
        time.sleep(interval)


# --------------------------------------------------------------------------- mounts

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MNT_DETACH = 2


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below *path* (deepest first)."""
    prefix = str(path).rstrip("/")
    found = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        mp = _unescape_mountinfo(fields[4])
        if mp == prefix or mp.startswith(prefix + "/"):
            found.append(mp)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def unmount_all_under(path: Path) -> None:
    for _ in range(5):
        mps = mounts_under(path)
        if not mps:
            return
        for mp in mps:
            _libc.umount2(os.fsencode(mp), MNT_DETACH)


# --------------------------------------------------------------------------- events


@dataclass
class Event:
    """One line of ``ctr events``: ``TIMESTAMP NAMESPACE TOPIC JSON``."""

    namespace: str
    topic: str
    data: dict[str, Any]
    raw: str

    @property
    def container_id(self) -> str | None:
        return self.data.get("container_id") or self.data.get("id")


_EVENT_RE = re.compile(r"^(?P<ts>\S+ \S+ \S+ \S+)\s+(?P<ns>\S+)\s+(?P<topic>/\S+)\s*(?P<body>.*)$")


def parse_event_line(line: str) -> Event | None:
    line = line.rstrip("\n")
    m = _EVENT_RE.match(line)
    if not m:
        # be tolerant of timestamp formats: find the first token starting with '/'
        tokens = line.split(" ")
        for i, tok in enumerate(tokens):
            if tok.startswith("/") and i >= 1:
                ns, topic, body = tokens[i - 1], tok, " ".join(tokens[i + 1 :])
                break
        else:
            return None
    else:
        ns, topic, body = m.group("ns"), m.group("topic"), m.group("body")
    data: dict[str, Any] = {}
    body = body.strip()
    if body.startswith("{"):
        with contextlib.suppress(ValueError):
            data = json.loads(body)
    return Event(namespace=ns, topic=topic, data=data, raw=line)


@dataclass
class EventWatcher:
    """Runs ``ctr events`` in the background and collects the parsed lines."""

    proc: subprocess.Popen[str]
    events: list[Event] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    def start_reader(self) -> None:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = parse_event_line(line)
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                if ev is not None:
                    self.events.append(ev)
                self._cond.notify_all()

    def for_container(self, container_id: str, prefix: str = "/tasks/") -> list[Event]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.topic.startswith(prefix) and e.data.get("container_id") == container_id
            ]

    def topics(self, container_id: str, prefix: str = "/tasks/") -> list[str]:
        return [e.topic for e in self.for_container(container_id, prefix)]

    def snapshot(self) -> list[Event]:
        with self._cond:
            return list(self.events)

    def wait_for(self, container_id: str, topic: str, timeout: float = 10.0) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.topic == topic and e.data.get("container_id") == container_id:
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise ContainerdError(
                        f"event {topic} for {container_id} not seen within {timeout}s; "
                        f"ctr events rc={self.proc.poll()} saw:\n" + "\n".join(self.lines[-30:])
                    )
                self._cond.wait(min(left, 0.2))

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGKILL: ctr forwards nothing here, but be uniform with attach (see quirks)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)


def remove_empty_cgroups(name: str, root: Path = Path("/sys/fs/cgroup")) -> None:
    """Remove the cgroup directories named ``name`` (a containerd namespace: its
    containers' parent) under ``root`` and under each v1 hierarchy, if nothing
    is left in them. containerd never removes them: every test run with its own
    namespace would leave ten empty cgroups behind on the machine."""
    for top in [root, *(d for d in root.iterdir() if d.is_dir())] if root.is_dir() else []:
        base = top / name
        if not base.is_dir() or not base.resolve().is_relative_to(top.resolve()):
            continue
        for dirpath, _, _ in sorted(os.walk(base), key=lambda w: -len(w[0])):  # leaves first
            with contextlib.suppress(OSError):  # busy (a process is in it): left alone
                os.rmdir(dirpath)


# --------------------------------------------------------------------------- containerd


class PrivateContainerd:
    """A private containerd daemon (child process of this process).

    *path* is the ``PATH`` containerd and its shims get and where containerd,
    ctr and runc are looked up (default: `default_path`); *containerd_bin* and
    *ctr_bin* override the binaries. `start` / `kill` / `restart` / `stop`
    keep the same config, root, state and addresses, so a restarted containerd
    finds its shims again.
    """

    def __init__(
        self,
        *,
        namespace: str | None = None,
        log_level: str = "trace",
        extra_env: dict[str, str] | None = None,
        base_dir: str | os.PathLike[str] = "/tmp",
        start_timeout: float = 30.0,
        path: str | None = None,
        containerd_bin: str | None = None,
        ctr_bin: str | None = None,
        dir_prefix: str = "pyshim-e2e-",
        namespace_prefix: str = "e2e",
        enable_cri: bool = False,
    ) -> None:
        self.path = path if path is not None else default_path()
        self.containerd_bin = containerd_bin
        self.ctr_bin = ctr_bin
        self.enable_cri = enable_cri
        self.dir = Path(tempfile.mkdtemp(prefix=dir_prefix, dir=base_dir))
        self.dir.chmod(0o711)
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.address = self.dir / "c.sock"
        if len(os.fsencode(str(self.address) + ".ttrpc")) > 100:
            raise ContainerdError(f"socket path too long for a unix socket: {self.address}")
        self.ttrpc_address = Path(str(self.address) + ".ttrpc")
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.namespace = namespace or f"{namespace_prefix}-{uuid.uuid4().hex[:8]}"
        self._own_namespace = namespace is None
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.env = {
            "PATH": self.path,
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.dir / "tmp"),
            "XDG_RUNTIME_DIR": str(self.dir / "xdg"),
            # pyshim's fork server for this containerd only (stopped by stop())
            "PYSHIM_FORKSERVER_DIR": str(self.dir / "fs"),
            # ctr 2.2+ warns about cgroup v1 on every command, into a -t terminal too
            "CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS": "1",
        }
        if extra_env:
            self.env.update(extra_env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._popens: list[subprocess.Popen[Any]] = []
        self.container_ids: set[str] = set()
        self.stopped = False
        self.write_config()
        atexit.register(self._atexit)

    def _atexit(self) -> None:
        # safety net for crashed demos/tests; a no-op after a regular stop()
        with contextlib.suppress(Exception):
            self.stop()

    # ------------------------------------------------------------------ tools

    def which(self, tool: str) -> str | None:
        return which(tool, self.path)

    def tool(self, name: str) -> str:
        """Path of containerd/ctr/runc (explicit overrides first), or the bare name."""
        override = {"containerd": self.containerd_bin, "ctr": self.ctr_bin}.get(name)
        return override or self.which(name) or name

    # ------------------------------------------------------------------ lifecycle

    def extra_config(self) -> str:
        """TOML appended to the generated config (subclasses: plugin sections)."""
        return ""

    def write_config(self) -> None:
        for d in (self.root, self.state, self.dir / "tmp", self.dir / "xdg", self.root / "opt"):
            d.mkdir(parents=True, exist_ok=True)
        disabled_cri = "" if self.enable_cri else '\n  "io.containerd.grpc.v1.cri",'
        cfg = f"""\
version = 2
root = "{self.root}"
state = "{self.state}"
oom_score = 0
disabled_plugins = [{disabled_cri}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.ttrpc_address}"

[debug]
  address = ""
  level = "{self.log_level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.root / "opt"}"
"""
        cfg += self.extra_config()
        self.config_path.write_text(cfg)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise ContainerdError("containerd already running")
        overrides = {"containerd": self.containerd_bin, "ctr": self.ctr_bin}
        require_tools([t for t, o in overrides.items() if o is None], self.path)  # + root check
        shim = self.which(shim_binary_name(RUNTIMES["pyshim"]))
        if shim and Path(shim).parent == venv_bin_dir():
            from shimv2 import launcher

            # A native launcher built before an edit would quietly fall back to
            # Python on every call: the fast path would go unmeasured and untested.
            launcher.ensure_current(shim)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill/stop
        self._log_file.write(f"==== harness: starting containerd {time.ctime()} ====\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            [self.tool("containerd"), "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.dir,
            start_new_session=True,
        )
        self.stopped = False
        self.wait_ready(self.start_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                rc = None if self.proc is None else self.proc.returncode
                raise ContainerdError(
                    f"containerd exited during startup (rc={rc}); log tail:\n{self.log_tail()}"
                )
            if self.address.exists():
                try:
                    r = self.ctr("version", timeout=5, namespaced=False)
                    if r.returncode == 0:
                        return
                    last = r.stderr
                except ContainerdError as e:
                    last = str(e)
            time.sleep(0.05)
        raise ContainerdError(
            f"containerd not ready after {timeout}s (last ctr error: {last.strip()}); "
            f"log tail:\n{self.log_tail()}"
        )

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def version(self) -> tuple[int, int, int]:
        """The containerd release this instance runs, e.g. ``(1, 7, 24)``."""
        return containerd_version(self.tool("containerd"))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send *sig* to containerd only (its shims live on) and wait for it to exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        """Start again with the same config, root, state and addresses."""
        self.kill(signal.SIGKILL)
        self.start()

    def __enter__(self) -> PrivateContainerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, remove: bool = True) -> list[str]:
        """Tear everything down; returns a list of things that had to be cleaned forcibly."""
        if self.stopped:
            return []
        self.stopped = True
        notes: list[str] = []
        for p in self._popens:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        if self.running():
            notes += self._delete_everything()
            self.kill(signal.SIGTERM, timeout=10)
        else:
            self.kill(signal.SIGKILL)
        # containers whose bundle is still in our state dir: force-delete through runc
        for cid in self.bundle_ids():
            if (self.runc_root / cid).exists():
                notes.append(f"runc delete --force {cid}")
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    subprocess.run(
                        [self.tool("runc"), "--root", str(self.runc_root), "delete", "--force",
                         cid],
                        capture_output=True, timeout=15, env=self.env,
                    )  # fmt: skip
        shims = self.shim_processes()
        if shims:
            notes.append(f"killed shim pids {[p.pid for p in shims]}")
            kill_and_wait(shims)
        self.stop_fork_servers()
        for sock in self.shim_socket_paths():
            if sock.exists():
                notes.append(f"removed stale shim socket {sock}")
                with contextlib.suppress(OSError):
                    sock.unlink()
        unmount_all_under(self.dir)
        if self._own_namespace:
            with contextlib.suppress(OSError):
                self.runc_root.rmdir()
            remove_empty_cgroups(self.namespace)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        return notes

    def stop_fork_servers(self) -> None:
        """The fork servers our shims launched in our private directory (they hold
        no state: stopping one never affects a shim)."""
        fs_dir = Path(self.env.get("PYSHIM_FORKSERVER_DIR", ""))
        if not fs_dir.is_relative_to(self.dir):
            return  # a directory the caller chose: not ours to clean
        servers = []
        for pid_file in fs_dir.glob("forkserver-*.pid"):
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                p = psutil.Process(int(pid_file.read_text()))
                if "forkserver" in " ".join(p.cmdline()):
                    servers.append(p)
        kill_and_wait(servers)

    def _delete_everything(self) -> list[str]:
        notes = []
        with contextlib.suppress(ContainerdError):
            tasks = self.ctr("task", "ls", "-q", timeout=10).stdout.split()
            for tid in tasks:
                notes.append(f"deleted leftover task {tid}")
                self.ctr("task", "kill", "-s", "SIGKILL", tid, timeout=10)
            for tid in tasks:
                with contextlib.suppress(ContainerdError):
                    self.wait_task_status(tid, {STOPPED, None}, timeout=5)
                self.ctr("task", "rm", "-f", tid, timeout=15)
        with contextlib.suppress(ContainerdError):
            for cid in self.ctr("container", "ls", "-q", timeout=10).stdout.split():
                notes.append(f"deleted leftover container {cid}")
                self.ctr("container", "rm", cid, timeout=15)
        return notes

    # ------------------------------------------------------------------ ctr

    def ctr_argv(self, *args: str, namespaced: bool = True) -> list[str]:
        argv = [self.tool("ctr"), "--address", str(self.address)]
        if namespaced:
            argv += ["--namespace", self.namespace]
        return argv + [str(a) for a in args]

    def ctr(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = CTR_TIMEOUT,
        check: bool = False,
        namespaced: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address SOCK --namespace NS ARGS``; never hangs longer than *timeout*."""
        argv = self.ctr_argv(*args, namespaced=namespaced)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise ContainerdError(
                f"`{' '.join(argv[3:])}` timed out after {timeout}s\n"
                f"stdout: {out!r}\nstderr: {err!r}"
            ) from None
        cp = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and cp.returncode != 0:
            raise ContainerdError(
                f"`{' '.join(argv[3:])}` failed rc={cp.returncode}\n"
                f"stdout: {out!r}\nstderr: {err!r}"
            )
        return cp

    def ctr_popen(
        self, *args: str, stdin: Any = subprocess.DEVNULL, **kw: Any
    ) -> subprocess.Popen[str]:
        """Start ctr in the background (own process group; killed at `stop`)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        p = subprocess.Popen(
            self.ctr_argv(*args), stdin=stdin, env=self.env, start_new_session=True, **kw
        )
        self._popens.append(p)
        return p

    def events(self) -> EventWatcher:
        """Subscribe with ``ctr events``; returns once the subscription is live.

        ctr prints nothing when it has subscribed, so we change a label on our
        namespace (which publishes ``/namespaces/update``) until the watcher
        sees it.
        """
        proc = self.ctr_popen("events", stderr=subprocess.STDOUT, bufsize=1)
        w = EventWatcher(proc)
        w.start_reader()
        probe = uuid.uuid4().hex[:12]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            self.ctr("namespaces", "label", self.namespace, f"e2e.probe={probe}", timeout=10)
            with w._cond:
                w._cond.wait(0.3)
                if any(
                    e.topic == "/namespaces/update"
                    and (e.data.get("labels") or {}).get("e2e.probe") == probe
                    for e in w.events
                ):
                    return w
                if proc.poll() is not None:
                    break
        w.stop()
        raise ContainerdError("ctr events subscription did not come up:\n" + "\n".join(w.lines))

    # ------------------------------------------------------------------ ids, tasks

    def new_id(self, prefix: str = "t") -> str:
        cid = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.container_ids.add(cid)
        return cid

    def tasks(self) -> dict[str, tuple[int, str]]:
        """``ctr task ls`` as {id: (pid, status)}."""
        r = self.ctr("task", "ls", timeout=15, check=True)
        out: dict[str, tuple[int, str]] = {}
        for line in r.stdout.splitlines()[1:]:
            f = line.split()
            if len(f) >= 3:
                out[f[0]] = (int(f[1]), f[2])
        return out

    def containers(self) -> list[str]:
        """``ctr container ls -q``."""
        return self.ctr("container", "ls", "-q", timeout=15, check=True).stdout.split()

    def task_status(self, cid: str) -> str | None:
        t = self.tasks().get(cid)
        return None if t is None else t[1]

    def task_pid(self, cid: str) -> int | None:
        t = self.tasks().get(cid)
        return None if t is None else t[0]

    def wait_task_status(
        self, cid: str, status: str | set[str | None] | None, timeout: float = 10.0
    ) -> str | None:
        wanted = status if isinstance(status, set) else {status}
        seen: list[str | None] = []

        def check() -> bool:
            s = self.task_status(cid)
            seen.append(s)
            return s in wanted

        try:
            wait_until(check, timeout, interval=0.1, what=f"task {cid} status in {wanted}")
        except ContainerdError as e:
            raise ContainerdError(f"{e}; last status {seen[-1:]}") from None
        return seen[-1]

    # ------------------------------------------------------------------ paths

    @property
    def runc_root(self) -> Path:
        return RUNC_STATE_ROOT / self.namespace

    def bundle_dir(self, cid: str) -> Path:
        return self.state / "io.containerd.runtime.v2.task" / self.namespace / cid

    def bundle_ids(self) -> list[str]:
        d = self.state / "io.containerd.runtime.v2.task" / self.namespace
        try:
            return sorted(p.name.lstrip(".") for p in d.iterdir())
        except OSError:
            return []

    def task_service(self, cid: str) -> str:
        """The Task service containerd calls on *cid*'s shim: v3 when its start
        response said version 3 (2.x Go shims, which serve only v3), else v2."""
        path = self.bundle_dir(cid) / "bootstrap.json"
        with contextlib.suppress(OSError, ValueError):
            if int(json.loads(path.read_text()).get("version", 2)) >= 3:
                return "containerd.task.v3.Task"
        return "containerd.task.v2.Task"

    def shim_address(self, cid: str) -> str:
        """The shim's ttrpc address (``unix:///run/containerd/s/<hex>``): ``<bundle>/address``
        as pyshim and the 1.x Go shim write it, or the JSON start response that the
        2.x Go shim prints and containerd 2.x keeps in ``bootstrap.json``."""
        bundle = self.bundle_dir(cid)
        path = bundle / "address"
        text = (path if path.exists() else bundle / "bootstrap.json").read_text().strip()
        if text.startswith("{"):
            return str(json.loads(text)["address"])
        return text

    def shim_socket_path(self, cid: str) -> Path:
        """Where a runc-v2-style shim for *cid* listens (sha256 of address/ns/id)."""
        key = os.path.normpath(os.path.join(str(self.address), self.namespace, cid))
        return SHIM_SOCKET_DIR / hashlib.sha256(key.encode()).hexdigest()

    def shim_socket_paths(self) -> list[Path]:
        paths = {self.shim_socket_path(c) for c in self.container_ids | set(self.bundle_ids())}
        for cid in self.bundle_ids():
            with contextlib.suppress(OSError):
                addr = self.shim_address(cid)
                if addr.startswith("unix://"):
                    paths.add(Path(addr[len("unix://") :]))
        return sorted(paths)

    def shim_processes(self, cid: str | None = None) -> list[psutil.Process]:
        """Live (non-zombie) shim processes started by THIS containerd (``-address <our sock>``)."""
        found = []
        me = os.getpid()
        # Fresh Process objects, not process_iter's cache: after hundreds of shims
        # were torn down, a cached entry whose pid was reused hid a live shim.
        for pid in psutil.pids():
            try:
                p = psutil.Process(pid)
                cmd = p.cmdline()
                p.info = {"pid": pid, "cmdline": cmd}  # as process_iter fills it; callers read it
                if p.pid == me or not has_flag(cmd, "-address", str(self.address)):
                    continue
                if cid is not None and not has_flag(cmd, "-id", cid):
                    continue
                if process_alive(p):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int, max_lines: int = 200) -> str:
        """containerd's log (shim log lines included) from byte *offset*, last *max_lines*."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-max_lines:])

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])

    # ------------------------------------------------------------------ leak checks

    def leaks(self, cid: str) -> list[str]:
        """What is left behind for a deleted container (empty list = clean)."""
        problems = []
        runc_state = self.runc_root / cid
        if runc_state.exists():
            problems.append(f"runc state left: {runc_state}")
        shims = self.shim_processes(cid)
        if shims:
            desc = [f"{p.pid}:{' '.join(p.info.get('cmdline') or [])}" for p in shims]
            problems.append(f"shim process(es) still alive: {desc}")
        sock = self.shim_socket_path(cid)
        for path in (sock, sock.with_name(sock.name + ".debug")):  # pyshim's debug socket
            if path.exists() and not shims:
                problems.append(f"socket left behind by a dead shim: {path}")
        bundle = self.bundle_dir(cid)
        if bundle.exists():
            problems.append(f"bundle dir left: {bundle}")
        return problems


# --------------------------------------------------------------------------- helpers

_NONZERO_RE = re.compile(r"exit with non-zero exit code (\d+)")


def exit_code_from_task_rm(stderr: str) -> int:
    """``ctr task rm`` exits 0 and prints the task's status on stderr only if non-zero."""
    m = _NONZERO_RE.search(stderr)
    return int(m.group(1)) if m else 0
