"""A private containerd for end-to-end tests.

The reusable part lives in the package (`shimv2.tools.containerd`, also used
by ``python -m shimv2.tools.stress``): every `Containerd` gets its own temp dir
(``/tmp/pyshim-e2e-XXXX``) holding its config, root, state, gRPC + ttrpc sockets
and log file, and its own namespace, so it never touches the system containerd
(``/run/containerd/containerd.sock``) or other instances on the machine. The
shim binaries are found through the ``PATH`` we give containerd: the venv's bin
dir first (that is where ``pip install -e .`` puts ``containerd-shim-pyshim-v2``),
then the system dirs (``containerd-shim-runc-v2``, ``runc``).

Two paths are compiled into containerd/the shims and therefore shared with every
other containerd on the machine: the shim sockets in ``/run/containerd/s`` and
the runc state root ``/run/containerd/runc/<ns>``. Our namespace is unique and
our socket names are hashes of our own gRPC address, so there are no clashes;
cleanup only ever touches entries derived from our address/namespace, and only
kills processes whose command line carries ``-address <our socket>``.

This module adds what only the tests need (the CRI plugin config, assertions,
the failure-report log offset) and re-exports the rest under the names the
tests, the demo and the benchmarks have always used. Usable on its own (see
``demo/demo.py``) and through the pytest fixtures in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shimv2.tools import containerd as _pc
from shimv2.tools.containerd import (
    CREATED,
    CTR_TIMEOUT,
    MNT_DETACH,
    PAUSED,
    REQUIRED_APPLETS,
    REQUIRED_TOOLS,
    RUNC_STATE_ROOT,
    RUNNING,
    RUNTIMES,
    SHIM_SOCKET_DIR,
    STATUS_NUMBERS,
    STOPPED,
    Event,
    EventWatcher,
    PrivateContainerd,
    busybox_rootfs,
    exit_code_from_task_rm,
    kill_and_wait,
    mounts_under,
    parse_event_line,
    pid_alive,
    shim_binary_name,
    system_path,
    unmount_all_under,
    venv_bin_dir,
    wait_until,
)
from shimv2.tools.containerd import ContainerdError as HarnessError
from shimv2.tools.containerd import has_flag as _has_flag
from shimv2.tools.containerd import process_alive as _alive

__all__ = [
    "CREATED",
    "CTR_TIMEOUT",
    "MNT_DETACH",
    "PAUSED",
    "REQUIRED_APPLETS",
    "REQUIRED_TOOLS",
    "RUNC_STATE_ROOT",
    "RUNNING",
    "RUNTIMES",
    "SHIM_SOCKET_DIR",
    "STATUS_NUMBERS",
    "STOPPED",
    "SYSTEM_PATH",
    "Containerd",
    "CriConfig",
    "Event",
    "EventWatcher",
    "HarnessError",
    "_alive",
    "_has_flag",
    "busybox_rootfs",
    "containerd_path",
    "exit_code_from_task_rm",
    "kill_and_wait",
    "missing_tools",
    "mounts_under",
    "parse_event_line",
    "pid_alive",
    "private_containerd",
    "require_tools",
    "shim_binary_name",
    "shim_installed",
    "unmount_all_under",
    "venv_bin_dir",
    "wait_until",
    "which",
]

#: where containerd, ctr, runc, busybox and the Go shim are looked up (after the venv's
#: bin dir); PYSHIM_E2E_PATH overrides it, e.g. to test against another containerd build
SYSTEM_PATH = system_path()


# --------------------------------------------------------------------------- tools


def containerd_path() -> str:
    """The PATH containerd (and therefore every shim) gets."""
    return f"{venv_bin_dir()}:{SYSTEM_PATH}"


def which(tool: str) -> str | None:
    return _pc.which(tool, containerd_path())


def missing_tools(tools: Iterable[str] = REQUIRED_TOOLS) -> list[str]:
    return _pc.missing_tools(tools, containerd_path())


def require_tools(tools: Iterable[str] = REQUIRED_TOOLS) -> None:
    """Raise `HarnessError` with an actionable message if a tool is missing or we are not root."""
    _pc.require_tools(tools, containerd_path())


def shim_installed(runtime: str) -> str | None:
    return which(shim_binary_name(runtime))


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
    #: ``SystemdCgroup = true`` in every runtime's options (a systemd node's setting;
    #: pods then need a ``.slice`` cgroup parent)
    systemd_cgroup: bool = False

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
            if self.systemd_cgroup:
                out += f"""
[{cri}.containerd.runtimes.{name}.options]
  SystemdCgroup = true
"""
        return out


class Containerd(PrivateContainerd):
    """A private containerd daemon (child process of the test process)."""

    def __init__(
        self,
        *,
        namespace: str | None = None,
        log_level: str = "trace",
        extra_env: dict[str, str] | None = None,
        base_dir: str | Path = "/tmp",
        start_timeout: float = 30.0,
        cri: CriConfig | None = None,
    ) -> None:
        self.cri = cri
        #: byte offset into the log where the current test started (failure reports)
        self.test_log_offset = 0
        super().__init__(
            namespace=namespace,
            log_level=log_level,
            extra_env=extra_env,
            base_dir=base_dir,
            start_timeout=start_timeout,
            path=containerd_path(),
            dir_prefix="pyshim-e2e-",
            namespace_prefix="e2e",
            enable_cri=cri is not None,
        )

    def extra_config(self) -> str:
        return "" if self.cri is None else self.cri.toml(self.dir / "cri")

    def __enter__(self) -> Containerd:
        self.start()
        return self

    # ------------------------------------------------------------------ assertions

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


def start_address(output: str) -> str:
    """The address a shim's ``start`` printed: ``unix://…`` (pyshim, 1.x Go shims) or
    the JSON response of 2.x Go shims (``{"version":3,"address":"unix://…",…}``)."""
    output = output.strip()
    return str(json.loads(output)["address"]) if output.startswith("{") else output


def task_service(containerd: Containerd, runtime: str) -> str:
    """The Task service a shim answers on: 2.x Go shims serve only v3 (pyshim both)."""
    if runtime == RUNTIMES["go"] and containerd.version >= (2, 0, 0):
        return "containerd.task.v3.Task"
    return "containerd.task.v2.Task"


def go_shim_limitation(
    request: Any, containerd: Containerd, runtime: str, since: tuple[int, int], reason: str
) -> None:
    """Mark the running test xfail for the Go shim under containerd >= *since*.

    Only ever for ``go``: the same checks run for pyshim, which must pass them.
    Not strict, so a Go shim that happens to manage is not a failure.
    """
    if runtime == RUNTIMES["go"] and containerd.version[:2] >= since:
        import pytest  # the harness also serves the demo and the bench

        version = ".".join(map(str, containerd.version))
        request.applymarker(
            pytest.mark.xfail(strict=False, reason=f"Go shim, containerd {version}: {reason}")
        )


@contextlib.contextmanager
def private_containerd(**kw: Any) -> Iterator[Containerd]:
    c = Containerd(**kw)
    try:
        c.start()
        yield c
    finally:
        c.stop()
