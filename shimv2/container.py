"""A container: its bundle, runc handle, init and exec processes, and the
nursery its background work (copy loops, exit handling) lives in.

The operations that change a container live here, one method each (create,
start, exec, kill, pause, checkpoint, exit handling, delete...); they raise the
errors containerd expects. TaskService maps the RPCs onto them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from typing import Any

import trio

from shimv2 import bundle as bundlefiles
from shimv2 import cgroups, mount
from shimv2.api.containerd.events import task_pb2 as events
from shimv2.cgroups import CgroupV1, CgroupV2
from shimv2.console import ConsoleIO
from shimv2.events import Publisher
from shimv2.options import ShimOptions
from shimv2.process import Process, Status, close_io, kill_error, timestamp
from shimv2.reaper import Exit, Reaper
from shimv2.runc import CheckpointOpts, RestoreOpts, Runc, RuncError
from shimv2.spool import SpoolConfig
from shimv2.stdio import LoggerContext, PipeIO, StdioSpec
from shimv2.tasks import GuardedNursery, Spawner
from shimv2.ttrpc import status

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


def prepare_bundle(bundle: str, container_id: str, opts: ShimOptions) -> dict[str, Any]:
    """config.json's ``linux`` section (ValueError if unusable),
    then the runc options (with the cgroup driver decided) persisted for ``delete``."""
    linux = check_spec(bundle)
    opts.systemd_cgroup = wants_systemd_cgroup(opts.systemd_cgroup, linux)
    try:
        bundlefiles.write_runc_options(bundle, opts)
    except OSError as exc:
        # Only `shim delete` after a dead shim reads it (and then falls back to
        # the default runc root): not worth failing the Create for.
        log.error(
            "could not persist the runc options of %s in %s: %s",
            container_id,
            bundlefiles.OPTIONS_FILE,
            exc.strerror or exc,
        )
    return linux


@contextlib.contextmanager
def exec_process_file(spec_json: bytes, terminal: bool) -> Iterator[str]:
    """The exec's OCI Process as a temporary file for ``runc exec --process``
    (one write: tempfile and a text-mode json.dump cost ~0.4 ms per exec)."""
    spec = json.loads(spec_json)
    if spec.get("terminal", False) != terminal:
        spec["terminal"] = terminal
        spec_json = json.dumps(spec).encode()
    directory = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    path = os.path.join(directory, f"runc-process{os.urandom(6).hex()}.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(spec_json)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


class Container:
    def __init__(
        self,
        container_id: str,
        bundle: str,
        namespace: str,
        options: ShimOptions,
        init: Process,
        linux: dict[str, Any],
        reaper: Reaper,
        publisher: Publisher,
    ) -> None:
        self.id = container_id
        self.bundle = bundle
        self.namespace = namespace
        self.options = options
        self.runc = Runc(reaper, options, namespace, bundle)
        self.init = init
        self.reaper = reaper
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

    def background(self) -> GuardedNursery | None:
        """The container's nursery, or None once it was closed."""
        return None if self._cancel.cancel_called else self._nursery

    def process(self, exec_id: str) -> Process | None:
        return self.execs.get(exec_id) if exec_id else self.init

    def reported_status(self, process: Process) -> Status:
        """What State reports: the execs of a paused (or pausing) container are too."""
        if not process.is_init and self.init.status in (Status.PAUSED, Status.PAUSING):
            return self.init.status
        return process.status

    # -- Create ----------------------------------------------------------------

    async def mount_rootfs(self, mounts: list[mount.Mount]) -> None:
        try:
            if mounts:  # ctr --rootfs, CRI with a mounted snapshot: nothing to mount
                await trio.to_thread.run_sync(self._mount, mounts)
        except OSError as exc:
            raise status.unknown(f"failed to mount rootfs component: {exc}") from exc

    def _mount(self, mounts: list[mount.Mount]) -> None:
        os.makedirs(self.rootfs, mode=0o711, exist_ok=True)
        try:
            for m in mounts:
                mount.mount(m, self.rootfs)
                self.mounted_rootfs = True
        except OSError:
            self._unmount()
            raise

    async def create(
        self, nursery: GuardedNursery, checkpoint: str, parent_checkpoint: str
    ) -> None:
        """``runc create`` (or, from a checkpoint, what Start restores): the init's stdio
        open, its pid known; on failure nothing of the container is left behind."""
        if checkpoint:
            # Restored at Start (runc restore creates and starts in one go).
            self.restore = RestoreOpts(
                image_path=checkpoint,
                work_path=self.options.criu_work_path or os.path.join(self.bundle, "work"),
                parent_path=parent_checkpoint,
            )
        init = self.init
        created = False
        try:
            io = await self.open_io(init)
            await nursery.start(self.run)
            if self.restore is None:
                pid_file = os.path.join(self.bundle, "init.pid")
                # A failing `runc create` may leave a half-created container (and a
                # waiting `runc init`): ours to remove, unless its state was there before.
                created = not os.path.lexists(os.path.join(self.runc.root, self.id))
                await self.runc.create(
                    self.id,
                    self.bundle,
                    pid_file,
                    io.runc_fds(),
                    console_socket=io.console_socket,
                    no_pivot=self.options.no_pivot_root,
                    no_new_keyring=self.options.no_new_keyring,
                )
                created = True
                await io.runc_started()
                init.pid = bundlefiles.read_pid(pid_file)
                io.start(self.nursery)
                self.watch_cgroup()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self._abort_create(created)
            if isinstance(exc, RuncError):
                raise status.unknown(f"OCI runtime create failed: {exc.message}") from exc
            if isinstance(exc, OSError):
                raise status.error_from_exception(exc) from exc
            raise

    async def _abort_create(self, created: bool) -> None:
        """Undo a failed Create: nothing of the container may be left behind."""
        if created:
            try:
                await self.runc.delete(self.id, force=True)
            except RuncError as exc:
                if "does not exist" not in exc.message:  # runc failed before creating it
                    log.warning("cleaning up failed create of %s: %s", self.id, exc)
        await close_io(self.init)
        self.close()
        unmount_error = await self.unmount_rootfs()
        if unmount_error is not None:
            log.warning("cleaning up failed create of %s: %s", self.id, unmount_error)

    async def open_io(self, process: Process) -> PipeIO | ConsoleIO:
        """The process's stdio, attached to it, ready for runc (a logger is running)."""
        io: PipeIO | ConsoleIO
        logger = LoggerContext(self.reaper.spawn, process.id, self.namespace)
        spool = SpoolConfig(
            self.bundle,
            self.options.spool_limit,
            prefix=f"{process.exec_id}." if process.exec_id else "",
            owner=f"exec {process.exec_id} of {self.id}" if process.exec_id else self.id,
        )
        if process.stdio.terminal:
            io = ConsoleIO(process.stdio, logger, spool)
        else:
            io = PipeIO(process.stdio, *self.io_owner, logger=logger, spool=spool)
        process.attach_io(io)
        await io.ready()
        return io

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

    # -- Start -----------------------------------------------------------------

    async def start_init(self) -> None:
        """``runc start`` of the init, or ``runc restore`` of one created from a checkpoint."""
        try:
            if self.restore is not None:
                await self._restore()
            else:
                await self.runc.start(self.id)
        except RuncError as exc:
            what = "restore" if self.restore is not None else "start"
            raise status.unknown(f"OCI runtime {what} failed: {exc.message}") from exc

    async def _restore(self) -> None:
        """``runc restore`` of a task created from a checkpoint: it runs from here on."""
        init = self.init
        assert self.restore is not None and init.io is not None
        pid_file = os.path.join(self.bundle, "init.pid")
        await self.runc.restore(
            self.id,
            self.bundle,
            pid_file,
            init.io.runc_fds(),
            self.restore,
            console_socket=init.io.console_socket,
            no_pivot=self.options.no_pivot_root,
        )
        await init.io.runc_started()
        init.pid = bundlefiles.read_pid(pid_file)
        init.io.start(self.nursery)
        self.watch_cgroup()
        self.restore = None

    # -- execs -----------------------------------------------------------------

    def add_exec(self, exec_id: str, stdio: StdioSpec, spec_json: bytes) -> Process:
        process = Process(self.id, exec_id, stdio)
        process.spec_json = spec_json
        self.execs[exec_id] = process
        return process

    def exec_started(self) -> None:
        if self.running_execs == 0:  # a new idle event only when leaving idle
            self.execs_idle = trio.Event()
        self.running_execs += 1

    async def start_exec(self, process: Process) -> None:
        """``runc exec`` of a created exec: its stdio open, running with its pid."""
        try:
            io = await self.open_io(process)
            pid_file = os.path.join(self.bundle, f"{process.exec_id}.pid")
            with exec_process_file(process.spec_json, process.stdio.terminal) as process_file:
                await self.runc.exec(
                    self.id,
                    process_file,
                    pid_file,
                    io.runc_fds(),
                    console_socket=io.console_socket,
                )
            await io.runc_started()
            process.set_running(bundlefiles.read_pid(pid_file))
            io.start(self.nursery)
        except RuncError as exc:
            raise status.unknown(f"OCI runtime exec failed: {exc.message}") from exc
        except OSError as exc:
            raise status.error_from_exception(exc) from exc

    def exec_failed(self, process: Process, nursery: Spawner) -> None:
        """An exec whose start failed; its stdio is closed in ``nursery``."""
        self.exec_finished()
        nursery.start_soon(close_io, process)
        # It never ran: it is stopped, and only Delete is left to do.
        process.set_exited(255, time.time_ns())

    def exec_finished(self) -> None:
        self.running_execs -= 1
        if self.running_execs == 0:
            self.execs_idle.set()

    # -- a running container ---------------------------------------------------

    async def kill(self, process: Process, signal_number: int, all_processes: bool) -> None:
        process.check_kill()
        if process.is_init:
            try:
                await self.runc.kill(self.id, signal_number, all=all_processes)
            except RuncError as exc:
                raise kill_error(exc) from exc
        else:
            try:
                os.kill(process.pid, signal_number)
            except ProcessLookupError as exc:
                raise kill_error(exc) from exc

    async def pause(self) -> None:
        init = self.init
        init.check_pause()
        init.status = Status.PAUSING
        try:
            await self.runc.pause(self.id)
        except RuncError as exc:
            if init.status == Status.PAUSING:
                init.status = Status.RUNNING
            raise status.unknown(f"OCI runtime pause failed: {exc.message}") from exc
        if init.status == Status.PAUSING:  # not exited meanwhile
            init.status = Status.PAUSED

    async def resume(self) -> None:
        init = self.init
        init.check_resume()
        try:
            await self.runc.resume(self.id)
        except RuncError as exc:
            raise status.unknown(f"OCI runtime resume failed: {exc.message}") from exc
        if init.status == Status.PAUSED:
            init.status = Status.RUNNING

    async def checkpoint(self, path: str, o: Any) -> str:
        """``runc checkpoint`` with containerd's CheckpointOptions ``o`` (either type);
        returns the image path."""
        image_path = path or o.image_path or self.options.criu_image_path
        if not image_path:
            raise status.invalid_argument("checkpoint needs an image path")
        # Without a work path criu works in a scratch dir, removed afterwards.
        work_path = o.work_path or self.options.criu_work_path
        scratch = not work_path
        if scratch:
            work_path = os.path.join(self.bundle, "work", "criu-work")
        opts = CheckpointOpts(
            image_path=image_path,
            work_path=work_path,
            leave_running=not o.exit,
            tcp_established=o.open_tcp,
            external_unix_sockets=o.external_unix_sockets,
            shell_job=o.terminal,
            file_locks=o.file_locks,
            empty_namespaces=list(o.empty_namespaces),
            cgroups_mode=o.cgroups_mode,
        )
        try:
            await self.runc.checkpoint(self.id, opts)
        except RuncError as exc:
            dump_log = os.path.join(self.bundle, "criu-dump.log")
            with contextlib.suppress(OSError):
                shutil.copyfile(os.path.join(work_path, "dump.log"), dump_log)
            first_line = exc.message.splitlines()[0] if exc.message else "checkpoint failed"
            raise status.unknown(f"{first_line} path= {dump_log}") from exc
        finally:
            if scratch:
                shutil.rmtree(work_path, ignore_errors=True)
        return image_path

    async def update(self, resources: dict[str, Any]) -> None:
        try:
            await self.runc.update(self.id, json.dumps(resources).encode())
        except RuncError as exc:
            raise status.unknown(f"OCI runtime update failed: {exc.message}") from exc

    def stats(self) -> Any:
        """The cgroup's metrics message (v1 or v2)."""
        if self.cgroup is None:
            raise status.not_found("cgroup does not exist")
        try:
            return self.cgroup.stats()
        except cgroups.CgroupGone as exc:
            raise status.not_found("cgroup does not exist") from exc

    async def pids(self) -> list[tuple[int, str]]:
        """The container's pids, each with its exec id ("" for the init and the rest)."""
        init = self.init
        # containerd >= 1.7 deletes a reloaded shim whose Pids is empty or fails
        # ("cleaning leaked shim process"), container and all. An init that has
        # exited (reaped or not yet), or whose `runc ps` failed, still owes
        # containerd its exit: it is listed, as ps lists a zombie, until Delete.
        holds_init = init.pid > 0 and not (init.deleted or init.deleting)
        try:
            pids = await self.runc.ps(self.id)
        except RuncError as exc:
            if not holds_init:
                raise status.unknown(exc.message) from exc
            log.warning("Pids of %s: runc ps failed, listing the init only: %s", self.id, exc)
            pids = []
        if holds_init and init.pid not in pids:
            pids.insert(0, init.pid)
        exec_ids = {p.pid: p.exec_id for p in self.execs.values() if p.pid}
        return [(pid, exec_ids.get(pid, "")) for pid in pids]

    # -- exits -----------------------------------------------------------------

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
        self.record_exit(process, e)

    def exit_settled(self, process: Process) -> bool:
        """Whether ``process``'s exit can be recorded at once, with nothing to wait
        for: an exec whose output has all gone (a short exec, by the time runc exec
        returned). Saves the task and the passes of the scheduler of handle_exit."""
        if process.is_init:
            return False
        if process.io is None:
            return True
        process.io.process_exited()
        return process.io.output_done.is_set()

    def record_exit(self, process: Process, e: Exit) -> None:
        """The exit, once its output has gone: persisted (the init's), then State,
        Wait and ``/tasks/exit`` all report it, with nothing awaited in between."""
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

    # -- Delete ----------------------------------------------------------------

    async def wait_output(self, process: Process) -> None:
        """Before a Delete: the process's output reaches its reader while it keeps moving."""
        if process.io is not None:
            await process.io.wait_output(IO_FLUSH_TIMEOUT)

    async def delete_exec(self, process: Process) -> None:
        await close_io(process)
        process.mark_deleted()
        self.execs.pop(process.exec_id, None)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.bundle, f"{process.exec_id}.pid"))

    async def delete(self) -> None:
        """``runc delete``; a container runc no longer knows is deleted as well."""
        try:
            await self.runc.delete(self.id)
        except RuncError as exc:
            if "does not exist" not in exc.message:
                raise status.unknown(f"failed to delete task: {exc.message}") from exc

    async def release(self) -> None:
        """After :meth:`delete`: the init is deleted, every stdio closed (the binary
        loggers stopped), the background work ended."""
        self.init.mark_deleted()
        await close_io(self.init, *self.execs.values())
        self.close()

    async def unmount_rootfs(self) -> OSError | None:
        """Unmount what :meth:`mount_rootfs` mounted; the error, if any, for the caller
        to report once the container is gone."""
        try:
            if self.mounted_rootfs:  # else no trip to a worker thread (~0.3 ms)
                await trio.to_thread.run_sync(self._unmount)
        except OSError as exc:
            return exc
        return None

    def _unmount(self) -> None:
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
