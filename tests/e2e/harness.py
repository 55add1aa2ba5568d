"""A private containerd for end-to-end tests.

Every `Containerd` gets its own temp dir (``/tmp/pyshim-e2e-XXXX``) holding its
config, root, state, gRPC + ttrpc sockets and log file, and its own namespace,
so it never touches the system containerd (``/run/containerd/containerd.sock``)
or other instances on the machine. The shim binaries are found through the
``PATH`` we give containerd: the venv's bin dir first (that is where
``pip install -e .`` puts ``containerd-shim-pyshim-v2``), then the system dirs
(``containerd-shim-runc-v2``, ``runc``).

Two paths are compiled into containerd/the shims and therefore shared with every
other containerd on the machine: the shim sockets in ``/run/containerd/s`` and
the runc state root ``/run/containerd/runc/<ns>``. Our namespace is unique and
our socket names are hashes of our own gRPC address, so there are no clashes;
cleanup only ever touches entries derived from our address/namespace, and only
kills processes whose command line carries ``-address <our socket>``.

Usable on its own (see ``demo/demo.py``) and through the pytest fixtures in
``conftest.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

# runtime type -> short id used in test ids
RUNTIMES: dict[str, str] = {
    "go": "io.containerd.runc.v2",
    "pyshim": "io.containerd.pyshim.v2",
}

#: compiled-in socket dir of runtime-v2 shims (independent of containerd --state)
SHIM_SOCKET_DIR = Path("/run/containerd/s")
#: runc state root used by the runc shims: <root>/<namespace>/<id>
RUNC_STATE_ROOT = Path("/run/containerd/runc")

#: default timeout (s) for one ctr invocation; nothing in the harness waits forever
CTR_TIMEOUT = 30.0
#: where containerd, ctr, runc, busybox and the Go shim are looked up (after the venv's
#: bin dir); PYSHIM_E2E_PATH overrides it, e.g. to test against another containerd build
SYSTEM_PATH = os.environ.get(
    "PYSHIM_E2E_PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)
REQUIRED_TOOLS = ("containerd", "ctr", "runc", "busybox")

# task states as printed by `ctr task ls`
RUNNING = "RUNNING"
STOPPED = "STOPPED"
CREATED = "CREATED"
PAUSED = "PAUSED"

# containerd.task.v1.Status enum as printed by `ctr shim state` (a number)
STATUS_NUMBERS = {"UNKNOWN": 0, CREATED: 1, RUNNING: 2, STOPPED: 3, PAUSED: 4, "PAUSING": 5}


class HarnessError(RuntimeError):
    """The harness could not do its job (missing tool, timeout, daemon died)."""


# --------------------------------------------------------------------------- tools


def shim_binary_name(runtime: str) -> str:
    """``io.containerd.pyshim.v2`` -> ``containerd-shim-pyshim-v2`` (containerd's rule)."""
    parts = runtime.split(".")
    if len(parts) < 2:
        raise ValueError(f"invalid runtime name {runtime!r}")
    return f"containerd-shim-{parts[-2]}-{parts[-1]}"


def venv_bin_dir() -> Path:
    """Directory of the running interpreter (not resolved: a venv's python is a symlink)."""
    return Path(sys.executable).parent


def containerd_path() -> str:
    """The PATH containerd (and therefore every shim) gets."""
    return f"{venv_bin_dir()}:{SYSTEM_PATH}"


def which(tool: str) -> str | None:
    return shutil.which(tool, path=containerd_path())


def missing_tools(tools: Iterable[str] = REQUIRED_TOOLS) -> list[str]:
    return [t for t in tools if which(t) is None]


def require_tools(tools: Iterable[str] = REQUIRED_TOOLS) -> None:
    """Raise `HarnessError` with an actionable message if a tool is missing or we are not root."""
    problems = []
    missing = missing_tools(tools)
    if missing:
        problems.append(
            f"missing required tool(s): {', '.join(missing)} (searched PATH={containerd_path()}); "
            "install them with `sudo scripts/install-deps.sh` "
            "(Debian: apt-get install containerd runc busybox-static)"
        )
    if os.geteuid() != 0:
        problems.append("e2e tests must run as root (containerd and runc need it)")
    if problems:
        raise HarnessError("; ".join(problems))


def shim_installed(runtime: str) -> str | None:
    return which(shim_binary_name(runtime))


# --------------------------------------------------------------------------- rootfs

#: applets we need at the very least (all of busybox's applets get linked anyway)
REQUIRED_APPLETS = (
    "sh", "sleep", "cat", "echo", "true", "false", "ls", "ps", "stty", "printf", "head",
    "dd", "yes", "kill", "wc", "env", "id", "seq", "tail", "grep", "mkdir", "rm", "touch",
    "date", "tr", "hostname", "mount", "readlink", "test", "[",
)  # fmt: skip


def busybox_rootfs(dest: str | os.PathLike[str], busybox: str | None = None) -> Path:
    """Build a minimal rootfs in *dest* from the statically linked busybox.

    ``ctr run --rootfs DIR`` uses DIR itself as the container root (spec
    ``root.path``, writable unless ``--read-only``); runc mounts /proc, /dev,
    /sys... inside the container's mount namespace, so only the mount points
    need to exist here.
    """
    root = Path(dest)
    src = busybox or which("busybox")
    if src is None:
        raise HarnessError("busybox not found; install busybox-static")
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


def _has_flag(cmdline: Sequence[str], flag: str, value: str) -> bool:
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


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie (zombies count as gone)."""
    try:
        return _alive(psutil.Process(pid))
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
        survivors = [p for p in procs if _alive(p)]
        if not survivors or time.monotonic() > deadline:
            return survivors
        time.sleep(0.05)


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll *predicate* until it returns a truthy value; raise `HarnessError` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.1f}s waiting for {what or predicate}")
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

    def wait_for(self, container_id: str, topic: str, timeout: float = 10.0) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.topic == topic and e.data.get("container_id") == container_id:
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise HarnessError(
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


# --------------------------------------------------------------------------- containerd


@dataclass
class CriConfig:
    """Enables containerd's CRI plugin (off by default) with these settings.

    CRI always works in the ``k8s.io`` namespace, so pass ``namespace="k8s.io"``
    to `Containerd` too. Everything CRI writes (its root/state dirs live under
    containerd's) stays in the private temp dir; CNI dirs point there as well
    (only host-network pods work: there is no CNI config) and the streaming
    server gets a random port so parallel instances do not clash. Caveat: runc's
    state root ``/run/containerd/runc/k8s.io`` and CRI's cgroup parent ``k8s.io``
    are then machine-wide names; our container ids are random, so there are no
    clashes, but removing those dirs (when empty) is up to the caller.
    """

    sandbox_image: str
    #: handler name -> runtime type; the first one is the default runtime
    runtimes: dict[str, str] = field(
        default_factory=lambda: {"runc": RUNTIMES["go"], "pyshim": RUNTIMES["pyshim"]}
    )
    snapshotter: str = "overlayfs"

    def toml(self, base: Path) -> str:
        for d in ("cni-bin", "cni-conf"):
            (base / d).mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        out = f"""
[{cri}]
  sandbox_image = "{self.sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # sandboxes ask for oom_score_adj -998, which needs CAP_SYS_RESOURCE; clamp it to ours
  restrict_oom_score_adj = true
  enable_selinux = false

[{cri}.cni]
  bin_dir = "{base / "cni-bin"}"
  conf_dir = "{base / "cni-conf"}"

[{cri}.containerd]
  snapshotter = "{self.snapshotter}"
  default_runtime_name = "{next(iter(self.runtimes))}"
"""
        for name, runtime_type in self.runtimes.items():
            out += f"""
[{cri}.containerd.runtimes.{name}]
  runtime_type = "{runtime_type}"
"""
        return out


class Containerd:
    """A private containerd daemon (child process of the test process)."""

    def __init__(
        self,
        *,
        namespace: str | None = None,
        log_level: str = "debug",
        extra_env: dict[str, str] | None = None,
        base_dir: str | os.PathLike[str] = "/tmp",
        start_timeout: float = 30.0,
        cri: CriConfig | None = None,
    ) -> None:
        self.cri = cri
        self.dir = Path(tempfile.mkdtemp(prefix="pyshim-e2e-", dir=base_dir))
        self.dir.chmod(0o711)
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.address = self.dir / "c.sock"
        if len(os.fsencode(str(self.address) + ".ttrpc")) > 100:
            raise HarnessError(f"socket path too long for a unix socket: {self.address}")
        self.ttrpc_address = Path(str(self.address) + ".ttrpc")
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.namespace = namespace or f"e2e-{uuid.uuid4().hex[:8]}"
        self._own_namespace = namespace is None
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.env = {
            "PATH": containerd_path(),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.dir / "tmp"),
            "XDG_RUNTIME_DIR": str(self.dir / "xdg"),
        }
        if extra_env:
            self.env.update(extra_env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._popens: list[subprocess.Popen[Any]] = []
        self.container_ids: set[str] = set()
        #: byte offset into the log where the current test started (failure reports)
        self.test_log_offset = 0
        self.stopped = False
        self.write_config()
        atexit.register(self._atexit)

    def _atexit(self) -> None:
        # safety net for crashed demos/tests; a no-op after a regular stop()
        with contextlib.suppress(Exception):
            self.stop()

    # ------------------------------------------------------------------ lifecycle

    def write_config(self) -> None:
        for d in (self.root, self.state, self.dir / "tmp", self.dir / "xdg", self.root / "opt"):
            d.mkdir(parents=True, exist_ok=True)
        disabled_cri = "" if self.cri is not None else '\n  "io.containerd.grpc.v1.cri",'
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
        if self.cri is not None:
            cfg += self.cri.toml(self.dir / "cri")
        self.config_path.write_text(cfg)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError("containerd already running")
        require_tools(("containerd", "ctr"))
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill/stop
        self._log_file.write(f"==== harness: starting containerd {time.ctime()} ====\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            [which("containerd") or "containerd", "--config", str(self.config_path)],
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
                raise HarnessError(
                    f"containerd exited during startup (rc={rc}); log tail:\n{self.log_tail()}"
                )
            if self.address.exists():
                try:
                    r = self.ctr("version", timeout=5, namespaced=False)
                    if r.returncode == 0:
                        return
                    last = r.stderr
                except HarnessError as e:
                    last = str(e)
            time.sleep(0.05)
        raise HarnessError(
            f"containerd not ready after {timeout}s (last ctr error: {last.strip()}); "
            f"log tail:\n{self.log_tail()}"
        )

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

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

    def __enter__(self) -> Containerd:
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
                        [which("runc") or "runc", "--root", str(self.runc_root), "delete",
                         "--force", cid],
                        capture_output=True, timeout=15, env=self.env,
                    )  # fmt: skip
        shims = self.shim_processes()
        if shims:
            notes.append(f"killed shim pids {[p.pid for p in shims]}")
            kill_and_wait(shims)
        for sock in self.shim_socket_paths():
            if sock.exists():
                notes.append(f"removed stale shim socket {sock}")
                with contextlib.suppress(OSError):
                    sock.unlink()
        unmount_all_under(self.dir)
        if self._own_namespace:
            with contextlib.suppress(OSError):
                self.runc_root.rmdir()
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        return notes

    def _delete_everything(self) -> list[str]:
        notes = []
        with contextlib.suppress(HarnessError):
            tasks = self.ctr("task", "ls", "-q", timeout=10).stdout.split()
            for tid in tasks:
                notes.append(f"deleted leftover task {tid}")
                self.ctr("task", "kill", "-s", "SIGKILL", tid, timeout=10)
            for tid in tasks:
                with contextlib.suppress(HarnessError):
                    self.wait_task_status(tid, {STOPPED, None}, timeout=5)
                self.ctr("task", "rm", "-f", tid, timeout=15)
        with contextlib.suppress(HarnessError):
            for cid in self.ctr("container", "ls", "-q", timeout=10).stdout.split():
                notes.append(f"deleted leftover container {cid}")
                self.ctr("container", "rm", cid, timeout=15)
        return notes

    # ------------------------------------------------------------------ ctr

    def ctr_argv(self, *args: str, namespaced: bool = True) -> list[str]:
        argv = [which("ctr") or "ctr", "--address", str(self.address)]
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
            raise HarnessError(
                f"`{' '.join(argv[3:])}` timed out after {timeout}s\n"
                f"stdout: {out!r}\nstderr: {err!r}"
            ) from None
        cp = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and cp.returncode != 0:
            raise HarnessError(
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
        raise HarnessError("ctr events subscription did not come up:\n" + "\n".join(w.lines))

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
        except HarnessError as e:
            raise HarnessError(f"{e}; last status {seen[-1:]}") from None
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

    def shim_address(self, cid: str) -> str:
        """Contents of ``<bundle>/address`` (``unix:///run/containerd/s/<hex>``)."""
        return (self.bundle_dir(cid) / "address").read_text()

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
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                if p.pid == me or not _has_flag(cmd, "-address", str(self.address)):
                    continue
                if cid is not None and not _has_flag(cmd, "-id", cid):
                    continue
                if _alive(p):
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
        if sock.exists() and not shims:
            problems.append(f"socket left behind by a dead shim: {sock}")
        bundle = self.bundle_dir(cid)
        if bundle.exists():
            problems.append(f"bundle dir left: {bundle}")
        return problems

    def assert_no_leaks(self, *cids: str, timeout: float = 5.0) -> None:
        """Poll up to *timeout* s until every container in *cids* left nothing behind."""
        deadline = time.monotonic() + timeout
        while True:
            problems = [f"{c}: {p}" for c in cids for p in self.leaks(c)]
            if not problems:
                return
            if time.monotonic() > deadline:
                raise AssertionError("leaks after task deletion:\n  " + "\n  ".join(problems))
            time.sleep(0.1)

    def assert_no_shims(self, timeout: float = 5.0) -> None:
        """No shim of this containerd alive at all (use when all tasks are deleted)."""
        deadline = time.monotonic() + timeout
        while True:
            shims = self.shim_processes()
            if not shims:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    "shim processes still alive: "
                    + "; ".join(f"{p.pid}:{' '.join(p.info.get('cmdline') or [])}" for p in shims)
                )
            time.sleep(0.1)


# --------------------------------------------------------------------------- helpers

_NONZERO_RE = re.compile(r"exit with non-zero exit code (\d+)")


def exit_code_from_task_rm(stderr: str) -> int:
    """``ctr task rm`` exits 0 and prints the task's status on stderr only if non-zero."""
    m = _NONZERO_RE.search(stderr)
    return int(m.group(1)) if m else 0


@contextlib.contextmanager
def private_containerd(**kw: Any) -> Iterator[Containerd]:
    c = Containerd(**kw)
    try:
        c.start()
        yield c
    finally:
        c.stop()
