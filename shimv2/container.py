"""A container: its bundle, runc handle, init and exec processes, and the
nursery its background work (copy loops, exit handling) lives in."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import trio

from shimv2 import bundle as bundlefiles
from shimv2 import mount
from shimv2.cgroups import CgroupV1, CgroupV2
from shimv2.options import ShimOptions
from shimv2.process import Process
from shimv2.runc import RestoreOpts, Runc
from shimv2.tasks import GuardedNursery

log = logging.getLogger(__name__)


def check_spec(bundle: str) -> dict[str, Any]:
    """The ``linux`` section of the bundle's config.json ({} without one), read once
    per Create. Raise ValueError unless the file can describe a container: a JSON
    object whose ``process`` has non-empty ``args`` (runc refuses anything less,
    but only with UNKNOWN and without naming the file)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from exc
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"not a JSON object but {type(spec).__name__}")
    process = spec.get("process")
    if not isinstance(process, dict):
        raise ValueError("process must be an object")
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise ValueError("process.args must be a non-empty list of strings")
    linux = spec.get("linux")
    return linux if isinstance(linux, dict) else {}


def has_own_pid_namespace(linux: dict[str, Any]) -> bool:
    """True when the spec gives the container a new PID namespace (no path).

    Without one, the processes left when the init exits must be killed by us;
    any doubt counts as "not own" so that they are.
    """
    namespaces = linux.get("namespaces")
    if not isinstance(namespaces, list):
        return False
    return any(
        isinstance(ns, dict) and ns.get("type") == "pid" and not ns.get("path") for ns in namespaces
    )


#: exists only when systemd is PID 1 (sd_booted(3)); runc tests the same path
SYSTEMD_RUN_DIR = "/run/systemd/system"


def systemd_running() -> bool:
    return os.path.isdir(SYSTEMD_RUN_DIR)


def wants_systemd_cgroup(explicit: bool | None, linux: dict[str, Any]) -> bool:
    """Whether runc gets ``--systemd-cgroup``: an explicit ``SystemdCgroup`` option
    wins; without one, a ``slice:prefix:name`` cgroupsPath asks for the systemd
    driver (CRI writes it for a ``.slice`` parent but sends a non-runc runtime no
    runc options), but only where systemd runs. Elsewhere runc's cgroupfs driver
    takes the path as a plain cgroup name, as with the Go shim: forcing systemd
    there makes runc refuse every container."""
    if explicit is not None:
        return explicit
    return ":" in str(linux.get("cgroupsPath") or "") and systemd_running()


class Container:
    def __init__(
        self,
        container_id: str,
        bundle: str,
        namespace: str,
        options: ShimOptions,
        runc: Runc,
        init: Process,
        linux: dict[str, Any],
    ) -> None:
        self.id = container_id
        self.bundle = bundle
        self.namespace = namespace
        self.options = options
        self.runc = runc
        self.init = init
        self.execs: dict[str, Process] = {}
        # Execs between Start and their exit being published; the init's exit
        # waits for them so that its /tasks/exit comes last.
        self.running_execs = 0
        self.execs_idle = trio.Event()
        self.execs_idle.set()
        self.mounted_rootfs = False
        self.own_pid_namespace = has_own_pid_namespace(linux)
        self.exit_file = bundlefiles.ExitFile(bundle)
        self.restore: RestoreOpts | None = None  # created from a checkpoint: restored at Start
        self.cgroup: CgroupV1 | CgroupV2 | None = None
        self.oom_kills_published = 0
        self._nursery: GuardedNursery | None = None
        self._cancel = trio.CancelScope()

    @property
    def io_owner(self) -> tuple[int, int]:
        """uid and gid for the container's ends of its stdio pipes."""
        return self.options.io_uid, self.options.io_gid

    @property
    def rootfs(self) -> str:
        return os.path.join(self.bundle, "rootfs")

    @property
    def nursery(self) -> GuardedNursery:
        assert self._nursery is not None, "container not running"
        return self._nursery

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the container's background tasks until :meth:`close`."""
        with self._cancel:
            async with trio.open_nursery() as nursery:
                self._nursery = GuardedNursery(nursery, f"container {self.id}")
                task_status.started()
                await trio.sleep_forever()

    def exec_started(self) -> None:
        if self.running_execs == 0:  # a new idle event only when leaving idle
            self.execs_idle = trio.Event()
        self.running_execs += 1

    def exec_finished(self) -> None:
        self.running_execs -= 1
        if self.running_execs == 0:
            self.execs_idle.set()

    def background(self) -> GuardedNursery | None:
        """The container's nursery, or None once it was closed."""
        return None if self._cancel.cancel_called else self._nursery

    def process(self, exec_id: str) -> Process | None:
        return self.execs.get(exec_id) if exec_id else self.init

    def mount_rootfs(self, mounts: list[mount.Mount]) -> None:
        if not mounts:
            return
        os.makedirs(self.rootfs, mode=0o711, exist_ok=True)
        try:
            for m in mounts:
                mount.mount(m, self.rootfs)
                self.mounted_rootfs = True
        except OSError:
            self.unmount_rootfs()
            raise

    def unmount_rootfs(self) -> None:
        if self.mounted_rootfs:
            mount.unmount_all(self.rootfs)
            self.mounted_rootfs = False

    def close(self) -> None:
        """Release stdio and stop background work; the container is gone."""
        self.exit_file.close()
        if self.cgroup is not None:
            self.cgroup.close()
        for process in [self.init, *self.execs.values()]:
            if process.io is not None:
                process.io.close()
        self._cancel.cancel()
