"""A container: its bundle, runc handle, init and exec processes, and the
nursery its background work (copy loops, exit handling) lives in."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from typing import Any

import trio

from shimv2 import bundle as bundlefiles
from shimv2 import cgroups, mount
from shimv2.api.containerd.events import task_pb2 as events
from shimv2.cgroups import CgroupV1, CgroupV2
from shimv2.events import Publisher
from shimv2.options import ShimOptions
from shimv2.process import Process, Status, timestamp
from shimv2.reaper import Exit
from shimv2.runc import RestoreOpts, Runc, RuncError
from shimv2.tasks import GuardedNursery

log = logging.getLogger(__name__)

# An exit waits for its output while the reader keeps taking it (an attached ctr
# closes its FIFOs once it has the exit status), but no longer than this after
# the output last moved: a reader that takes nothing does not hold the exit.
IO_FLUSH_TIMEOUT = 2.0


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
        publisher: Publisher,
    ) -> None:
        self.id = container_id
        self.bundle = bundle
        self.namespace = namespace
        self.options = options
        self.runc = runc
        self.init = init
        self.publisher = publisher
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

    def watch_cgroup(self) -> None:
        """Find the container's cgroup (for Stats) and arm the OOM watcher right away."""
        if self.cgroup is not None:
            self.cgroup.close()  # it keeps its OOM counter file open
        try:
            self.cgroup = cgroups.detect(self.init.pid)
        except (OSError, cgroups.CgroupError) as exc:
            log.warning("no cgroup for %s: %s", self.id, exc)
            return
        self.oom_kills_published = self.cgroup.oom_kills() or 0

        def on_oom() -> None:
            self.publish_ooms(notified=True)

        self.nursery.start_soon(self.cgroup.watch_oom, on_oom)

    def publish_ooms(self, notified: bool = False) -> None:
        """/tasks/oom for every OOM kill not yet reported (also called before an exit,
        so a killed init's OOM event always precedes its /tasks/exit)."""
        if self.cgroup is None:
            return
        count = self.cgroup.oom_kills()
        if count is None:  # no counter (old kernel): trust the notification
            new = 1 if notified else 0
        else:
            new = count - self.oom_kills_published
            self.oom_kills_published = max(count, self.oom_kills_published)
        if new > 0:
            self.publisher.publish("/tasks/oom", events.TaskOOM(container_id=self.id))

    async def handle_exit(self, process: Process, e: Exit) -> None:
        if process.is_init:
            if not self.own_pid_namespace:
                # Without its own PID namespace nothing kills the init's descendants.
                try:
                    await self.runc.kill(self.id, signal.SIGKILL, all=True)
                except RuncError as exc:
                    log.warning("kill --all after init exit of %s: %s", self.id, exc)
            if process.status in (Status.PAUSED, Status.PAUSING):
                # Killed while frozen: thaw the cgroup so runc can delete it.
                try:
                    await self.runc.resume(self.id)
                except RuncError as exc:
                    log.warning("resume after exit of paused %s: %s", self.id, exc)
            # The execs die with the init (and if runc could not kill them, we do:
            # an exec we have not reaped still owns its pid); their exits come first.
            for exec_process in self.execs.values():
                if exec_process.pid and not exec_process.reaped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(exec_process.pid, signal.SIGKILL)
            await self.execs_idle.wait()
        if process.io is not None:
            process.io.process_exited()  # a pty's output ends once drained
        if process.io is not None and not await process.io.wait_output(IO_FLUSH_TIMEOUT):
            log.warning(
                "%s: output not all read (its reader took nothing for %.0fs, or an orphan "
                "still writes); publishing the exit, delivery goes on until Delete",
                process.id,
                IO_FLUSH_TIMEOUT,
            )
        if process.is_init:
            # Persisted before anyone hears of it: `delete` after a dead shim reports it.
            record = bundlefiles.ExitRecord(process.pid, e.status, e.timestamp_ns)
            try:
                self.exit_file.write(record)
            except OSError as exc:
                # A full or read-only bundle filesystem must not cost the exit: State,
                # Wait and the event still report it (and the journal may hold it).
                log.error(
                    "could not persist the exit of %s in %s: %s; kept in memory",
                    self.id,
                    bundlefiles.EXIT_FILE,
                    exc.strerror or exc,
                )
        # Nothing awaited from here to the publish: State, Wait and the events agree.
        self.publish_ooms()
        process.set_exited(e.status, e.timestamp_ns)
        self.publisher.publish(
            "/tasks/exit",
            events.TaskExit(
                container_id=self.id,
                id=process.id,
                pid=process.pid,
                exit_status=e.status,
                exited_at=timestamp(e.timestamp_ns),
            ),
        )
        if not process.is_init:
            self.exec_finished()
