"""The Task service: one method per RPC (spec: task-api.md §3).

Handlers validate, find the container and process, drive runc, and publish
events. Exits that race a Create/Start are held by the exit matcher
(:mod:`shimv2.exits`) until the start event is published, so ``/tasks/exit``
never precedes ``/tasks/start``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

import trio
from google.protobuf import empty_pb2

from shimv2 import bundle as bundlefiles
from shimv2 import cgroups, tracing
from shimv2 import container as container_module
from shimv2 import options as shimoptions
from shimv2.api.containerd.events import task_pb2 as events
from shimv2.api.containerd.runc.options import oci_pb2
from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.api.containerd.types.task import task_pb2 as tasktypes
from shimv2.console import ConsoleIO
from shimv2.container import Container, check_spec, wants_systemd_cgroup
from shimv2.events import Publisher, pack
from shimv2.exits import ExitMatcher, ExitSubscriber
from shimv2.mount import Mount
from shimv2.process import Process, Status, kill_error, timestamp
from shimv2.reaper import Reaper
from shimv2.runc import CheckpointOpts, RestoreOpts, Runc, RuncError
from shimv2.spool import SpoolConfig
from shimv2.stdio import LoggerContext, PipeIO, StdioSpec
from shimv2.tasks import GuardedNursery
from shimv2.ttrpc import Code, Method, RequestContext, TTRPCError, status

log = logging.getLogger(__name__)

TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")
# containerd's identifier rule (identifiers/validate.go).
_IDENTIFIER = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
_MAX_ID = 76


def validate_id(value: str, what: str = "container id") -> None:
    if not value or len(value) > _MAX_ID or not _IDENTIFIER.match(value):
        raise status.invalid_argument(f"invalid {what} {value!r}")


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def _uncancellable(handler: Handler) -> Handler:
    """Let a state-changing RPC finish even if containerd stops waiting (timeout_nano):
    a Create, Start or Delete cut off halfway would leave runc and our tables apart.
    containerd drops the late answer; the state stays whole."""

    @functools.wraps(handler)
    async def run(*args: Any) -> Any:
        with trio.CancelScope(shield=True):
            return await handler(*args)

    return cast(Handler, run)


@contextlib.contextmanager
def _process_file(spec_json: bytes, terminal: bool) -> Iterator[str]:
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


def _prepare_bundle(
    bundle: str, container_id: str, opts: shimoptions.ShimOptions
) -> dict[str, Any]:
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


class TaskService:
    def __init__(
        self,
        *,
        namespace: str,
        reaper: Reaper,
        publisher: Publisher,
        nursery: trio.Nursery,
        on_shutdown: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._reaper = reaper
        self._publisher = publisher
        self._nursery = GuardedNursery(nursery, "shim")
        self._on_shutdown = on_shutdown
        self._shutdown_requested = False
        self._exits = ExitMatcher(self._nursery)
        reaper.subscribe(self._exits.on_exit)

    def methods(self) -> dict[str, Method]:
        """The handlers, each in a span while tracing is on (Create may turn it on)."""
        methods = {
            "Create": Method(api.CreateTaskRequest, self.create),
            "Start": Method(api.StartRequest, self.start),
            "Delete": Method(api.DeleteRequest, self.delete),
            "State": Method(api.StateRequest, self.state),
            "Wait": Method(api.WaitRequest, self.wait),
            "Kill": Method(api.KillRequest, self.kill),
            "Pids": Method(api.PidsRequest, self.pids),
            "Connect": Method(api.ConnectRequest, self.connect),
            "Shutdown": Method(api.ShutdownRequest, self.shutdown),
            "Exec": Method(api.ExecProcessRequest, self.exec),
            "CloseIO": Method(api.CloseIORequest, self.close_io),
            "ResizePty": Method(api.ResizePtyRequest, self.resize_pty),
            "Pause": Method(api.PauseRequest, self.pause),
            "Resume": Method(api.ResumeRequest, self.resume),
            "Update": Method(api.UpdateTaskRequest, self.update),
            "Stats": Method(api.StatsRequest, self.stats),
            "Checkpoint": Method(api.CheckpointTaskRequest, self.checkpoint),
        }
        return {
            name: Method(m.request_type, tracing.traced(m.handler, may_configure=name == "Create"))
            for name, m in methods.items()
        }

    # -- lookups ----------------------------------------------------------------

    def _container(self, container_id: str) -> Container:
        container = self.containers.get(container_id)
        if container is None:
            raise status.not_found("container not created")
        return container

    def _process(self, container_id: str, exec_id: str) -> tuple[Container, Process]:
        container = self._container(container_id)
        process = container.process(exec_id)
        if process is None:
            raise status.not_found(f"process does not exist {exec_id}")
        return container, process

    async def _open_io(self, container: Container, process: Process) -> PipeIO | ConsoleIO:
        """The process's stdio, attached to it, ready for runc (a logger is running)."""
        io: PipeIO | ConsoleIO
        logger = LoggerContext(self._reaper.spawn, process.id, self.namespace)
        spool = SpoolConfig(
            container.bundle,
            container.options.spool_limit,
            prefix=f"{process.exec_id}." if process.exec_id else "",
            owner=f"exec {process.exec_id} of {container.id}" if process.exec_id else container.id,
        )
        if process.stdio.terminal:
            io = ConsoleIO(process.stdio, logger, spool)
        else:
            io = PipeIO(process.stdio, *container.io_owner, logger=logger, spool=spool)
        process.attach_io(io)
        await io.ready()
        return io

    async def _close_io(self, *processes: Process) -> None:
        """Release the stdio of deleted processes; their binary loggers are stopped together."""
        ios = [p.io for p in processes if p.io is not None]
        for io in ios:
            io.close()
        async with trio.open_nursery() as nursery:
            for io in ios:
                nursery.start_soon(io.shutdown_logger)

    # -- RPCs -------------------------------------------------------------------

    @_uncancellable
    async def create(
        self, req: api.CreateTaskRequest, ctx: RequestContext
    ) -> api.CreateTaskResponse:
        validate_id(req.id)
        if req.id in self.containers or req.id in self._creating:
            raise status.already_exists(f"container {req.id}")
        if not os.path.isabs(req.bundle) or not os.path.isdir(req.bundle):
            raise status.invalid_argument(f"bundle {req.bundle!r} is not a directory")
        if not os.path.isfile(os.path.join(req.bundle, "config.json")):
            raise status.invalid_argument(f"bundle {req.bundle} has no config.json")
        self._creating.add(req.id)
        try:
            try:
                opts = shimoptions.from_any(req.options.type_url, req.options.value)
            except ValueError as exc:
                raise status.invalid_argument(str(exc)) from exc
            if opts.otel_env:
                tracing.configure(os.environ, opts.otel_env)
            try:
                # On the event loop, like the pid file and the journal: small files in
                # the bundle. A worker thread would not run the JSON parser beside the
                # loop (the GIL), and a fresh daemon's first one costs ~1.2 ms to start.
                linux = _prepare_bundle(req.bundle, req.id, opts)
            except ValueError as exc:
                raise status.invalid_argument(
                    f"invalid config.json in {req.bundle}: {exc}"
                ) from None
            container, subscriber = await self._create(req, linux, opts)
        finally:
            self._creating.discard(req.id)
        init = container.init
        self.containers[req.id] = container
        self._publisher.open_journal(req.id, req.bundle)
        self._publisher.publish(
            "/tasks/create",
            events.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=req.rootfs,
                io=events.TaskIO(
                    stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                ),
                checkpoint=req.checkpoint,
                pid=init.pid,
            ),
        )
        self._exits.started(container, init, subscriber)
        return api.CreateTaskResponse(pid=init.pid)

    async def _create(
        self, req: api.CreateTaskRequest, linux: dict[str, Any], opts: shimoptions.ShimOptions
    ) -> tuple[Container, ExitSubscriber]:
        stdio = StdioSpec(req.stdin, req.stdout, req.stderr, req.terminal)
        init = Process(req.id, "", stdio)
        runc = Runc(self._reaper, opts, self.namespace, req.bundle)
        container = Container(
            req.id, req.bundle, self.namespace, opts, runc, init, linux, self._publisher
        )
        mounts = [Mount(m.type, m.source, tuple(m.options)) for m in req.rootfs]
        try:
            if mounts:  # ctr --rootfs, CRI with a mounted snapshot: nothing to mount
                await trio.to_thread.run_sync(container.mount_rootfs, mounts)
        except OSError as exc:
            raise status.unknown(f"failed to mount rootfs component: {exc}") from exc
        if req.checkpoint:
            # Restored at Start (runc restore creates and starts in one go).
            container.restore = RestoreOpts(
                image_path=req.checkpoint,
                work_path=opts.criu_work_path or os.path.join(req.bundle, "work"),
                parent_path=req.parent_checkpoint,
            )
        subscriber = self._exits.subscribe()
        created = False
        try:
            io = await self._open_io(container, init)
            await self._nursery.start(container.run)
            if container.restore is None:
                pid_file = os.path.join(req.bundle, "init.pid")
                # A failing `runc create` may leave a half-created container (and a
                # waiting `runc init`): ours to remove, unless its state was there before.
                created = not os.path.lexists(os.path.join(runc.root, req.id))
                await runc.create(
                    req.id,
                    req.bundle,
                    pid_file,
                    io.runc_fds(),
                    console_socket=io.console_socket,
                    no_pivot=opts.no_pivot_root,
                    no_new_keyring=opts.no_new_keyring,
                )
                created = True
                await io.runc_started()
                init.pid = bundlefiles.read_pid(pid_file)
                io.start(container.nursery)
                container.watch_cgroup()
        except BaseException as exc:
            self._exits.unsubscribe(subscriber)
            with trio.CancelScope(shield=True):
                await self._abort_create(container, created)
            if isinstance(exc, RuncError):
                raise status.unknown(f"OCI runtime create failed: {exc.message}") from exc
            if isinstance(exc, OSError):
                raise status.error_from_exception(exc) from exc
            raise
        return container, subscriber

    async def _abort_create(self, container: Container, created: bool) -> None:
        """Undo a failed Create: nothing of the container may be left behind."""
        if created:
            try:
                await container.runc.delete(container.id, force=True)
            except RuncError as exc:
                if "does not exist" not in exc.message:  # runc failed before creating it
                    log.warning("cleaning up failed create of %s: %s", container.id, exc)
        self._exits.forget(container.init)
        await self._close_io(container.init)
        container.close()
        try:
            await trio.to_thread.run_sync(container.unmount_rootfs)
        except OSError as exc:
            log.warning("cleaning up failed create of %s: %s", container.id, exc)

    @_uncancellable
    async def start(self, req: api.StartRequest, ctx: RequestContext) -> api.StartResponse:
        container, process = self._process(req.id, req.exec_id)
        process.begin_start()
        try:
            if process.is_init:
                return await self._start_init(container, process)
            return await self._start_exec(container, process)
        finally:
            process.starting = False

    async def _start_init(self, container: Container, process: Process) -> api.StartResponse:
        # An exit during `runc start` must wait until /tasks/start is published.
        self._exits.forget(process)
        subscriber = self._exits.subscribe()
        try:
            if container.restore is not None:
                await self._restore(container, process)
            else:
                await container.runc.start(container.id)
        except RuncError as exc:
            self._exits.started(container, process, subscriber)
            what = "restore" if container.restore is not None else "start"
            raise status.unknown(f"OCI runtime {what} failed: {exc.message}") from exc
        except BaseException:
            self._exits.started(container, process, subscriber)
            raise
        process.set_running(process.pid)
        self._publisher.publish(
            "/tasks/start", events.TaskStart(container_id=container.id, pid=process.pid)
        )
        self._exits.started(container, process, subscriber)
        return api.StartResponse(pid=process.pid)

    async def _restore(self, container: Container, init: Process) -> None:
        """``runc restore`` of a task created from a checkpoint: it runs from here on."""
        assert container.restore is not None and init.io is not None
        pid_file = os.path.join(container.bundle, "init.pid")
        await container.runc.restore(
            container.id,
            container.bundle,
            pid_file,
            init.io.runc_fds(),
            container.restore,
            console_socket=init.io.console_socket,
            no_pivot=container.options.no_pivot_root,
        )
        await init.io.runc_started()
        init.pid = bundlefiles.read_pid(pid_file)
        init.io.start(container.nursery)
        container.watch_cgroup()
        container.restore = None

    async def _start_exec(self, container: Container, process: Process) -> api.StartResponse:
        init = container.init
        if init.reaped or init.status == Status.STOPPED or init.deleted:
            raise status.failed_precondition(
                f"container {container.id} init process is not running"
            )
        container.exec_started()
        subscriber = self._exits.subscribe()
        try:
            io = await self._open_io(container, process)
            pid_file = os.path.join(container.bundle, f"{process.exec_id}.pid")
            with _process_file(process.spec_json, process.stdio.terminal) as process_file:
                await container.runc.exec(
                    container.id,
                    process_file,
                    pid_file,
                    io.runc_fds(),
                    console_socket=io.console_socket,
                )
            await io.runc_started()
            process.set_running(bundlefiles.read_pid(pid_file))
            io.start(container.nursery)
        except BaseException as exc:
            self._exits.unsubscribe(subscriber)
            container.exec_finished()
            self._nursery.start_soon(self._close_io, process)
            # It never ran: it is stopped, and only Delete is left to do.
            process.set_exited(255, time.time_ns())
            if isinstance(exc, RuncError):
                raise status.unknown(f"OCI runtime exec failed: {exc.message}") from exc
            if isinstance(exc, OSError):
                raise status.error_from_exception(exc) from exc
            raise
        self._publisher.publish(
            "/tasks/exec-started",
            events.TaskExecStarted(
                container_id=container.id, exec_id=process.exec_id, pid=process.pid
            ),
        )
        self._exits.started(container, process, subscriber)
        return api.StartResponse(pid=process.pid)

    @_uncancellable
    async def exec(self, req: api.ExecProcessRequest, ctx: RequestContext) -> empty_pb2.Empty:
        validate_id(req.exec_id, "exec id")
        container = self._container(req.id)
        if req.exec_id in container.execs:
            raise status.already_exists(f"id {req.exec_id}")
        init = container.init
        if init.state_name in ("deleted", "stopped", "paused", "pausing"):
            raise status.unknown(f"cannot exec in a {init.state_name} state")
        try:
            spec = json.loads(req.spec.value)
            if not isinstance(spec, dict) or not spec.get("args"):
                raise ValueError("the process has no args")
        except ValueError as exc:
            raise status.invalid_argument(f"invalid exec process spec: {exc}") from exc
        process = Process(
            container.id, req.exec_id, StdioSpec(req.stdin, req.stdout, req.stderr, req.terminal)
        )
        process.spec_json = req.spec.value
        container.execs[req.exec_id] = process
        self._publisher.publish(
            "/tasks/exec-added",
            events.TaskExecAdded(container_id=container.id, exec_id=req.exec_id),
        )
        return empty_pb2.Empty()

    async def close_io(self, req: api.CloseIORequest, ctx: RequestContext) -> empty_pb2.Empty:
        _, process = self._process(req.id, req.exec_id)
        if req.stdin:
            process.close_stdin()
        return empty_pb2.Empty()

    async def resize_pty(self, req: api.ResizePtyRequest, ctx: RequestContext) -> empty_pb2.Empty:
        _, process = self._process(req.id, req.exec_id)
        if not process.is_init and process.status == Status.STOPPED:
            raise status.unknown("cannot resize a stopped container")
        if process.io is not None:
            try:
                process.io.resize(req.width, req.height)
            except OSError as exc:
                raise status.error_from_exception(exc) from exc
        return empty_pb2.Empty()

    @_uncancellable
    async def delete(self, req: api.DeleteRequest, ctx: RequestContext) -> api.DeleteResponse:
        container, process = self._process(req.id, req.exec_id)
        process.begin_delete()
        try:
            if process.io is not None:
                await process.io.wait_output(container_module.IO_FLUSH_TIMEOUT)
            if process.is_init:
                await self._delete_container(container)
        except BaseException:
            process.deleting = False
            raise
        if not process.is_init:
            await self._close_io(process)
            process.mark_deleted()
            container.execs.pop(process.exec_id, None)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(container.bundle, f"{process.exec_id}.pid"))
        return api.DeleteResponse(
            pid=process.pid,
            exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at_or_zero),
        )

    async def _delete_container(self, container: Container) -> None:
        init = container.init
        try:
            await container.runc.delete(container.id)
        except RuncError as exc:
            if "does not exist" not in exc.message:
                raise status.unknown(f"failed to delete task: {exc.message}") from exc
        self._exits.forget(init)
        init.mark_deleted()
        await self._close_io(init, *container.execs.values())
        container.close()
        self.containers.pop(container.id, None)
        unmount_error = None
        try:
            if container.mounted_rootfs:  # else no trip to a worker thread (~0.3 ms)
                await trio.to_thread.run_sync(container.unmount_rootfs)
        except OSError as exc:
            unmount_error = exc
        self._publisher.publish(
            "/tasks/delete",
            events.TaskDelete(
                container_id=container.id,
                pid=init.pid,
                exit_status=init.exit_status,
                exited_at=timestamp(init.exited_at_or_zero),
            ),
        )
        # The task is deleted: its journal goes once /tasks/delete is delivered.
        self._publisher.release_journal(container.id)
        self._shutdown_if_idle()
        if unmount_error is not None:
            raise status.unknown(f"failed rootfs umount: {unmount_error}")

    async def state(self, req: api.StateRequest, ctx: RequestContext) -> api.StateResponse:
        container, process = self._process(req.id, req.exec_id)
        state = process.status
        if not process.is_init and container.init.status in (Status.PAUSED, Status.PAUSING):
            state = container.init.status
        return api.StateResponse(
            id=process.id,
            bundle=container.bundle,
            pid=process.pid,
            status=tasktypes.Status.Value(state.name),
            stdin=process.stdio.stdin,
            stdout=process.stdio.stdout,
            stderr=process.stdio.stderr,
            terminal=process.stdio.terminal,
            exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at_or_zero),
            exec_id=process.exec_id,
        )

    async def wait(self, req: api.WaitRequest, ctx: RequestContext) -> api.WaitResponse:
        _, process = self._process(req.id, req.exec_id)
        if not process.exited.is_set():
            with ctx.cancel_on_disconnect():
                await process.exited.wait()
        if not process.exited.is_set():
            raise TTRPCError(Code.CANCELLED, "connection closed")
        return api.WaitResponse(
            exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at_or_zero),
        )

    @_uncancellable
    async def kill(self, req: api.KillRequest, ctx: RequestContext) -> empty_pb2.Empty:
        container, process = self._process(req.id, req.exec_id)
        process.check_kill()
        if process.is_init:
            try:
                await container.runc.kill(container.id, req.signal, all=req.all)
            except RuncError as exc:
                raise kill_error(exc) from exc
        else:
            try:
                os.kill(process.pid, req.signal)
            except ProcessLookupError as exc:
                raise kill_error(exc) from exc
        return empty_pb2.Empty()

    @_uncancellable
    async def pause(self, req: api.PauseRequest, ctx: RequestContext) -> empty_pb2.Empty:
        container = self._container(req.id)
        init = container.init
        init.check_pause()
        init.status = Status.PAUSING
        try:
            await container.runc.pause(container.id)
        except RuncError as exc:
            if init.status == Status.PAUSING:
                init.status = Status.RUNNING
            raise status.unknown(f"OCI runtime pause failed: {exc.message}") from exc
        if init.status == Status.PAUSING:  # not exited meanwhile
            init.status = Status.PAUSED
        self._publisher.publish("/tasks/paused", events.TaskPaused(container_id=container.id))
        return empty_pb2.Empty()

    @_uncancellable
    async def resume(self, req: api.ResumeRequest, ctx: RequestContext) -> empty_pb2.Empty:
        container = self._container(req.id)
        init = container.init
        init.check_resume()
        try:
            await container.runc.resume(container.id)
        except RuncError as exc:
            raise status.unknown(f"OCI runtime resume failed: {exc.message}") from exc
        if init.status == Status.PAUSED:
            init.status = Status.RUNNING
        self._publisher.publish("/tasks/resumed", events.TaskResumed(container_id=container.id))
        return empty_pb2.Empty()

    @_uncancellable
    async def checkpoint(
        self, req: api.CheckpointTaskRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        container = self._container(req.id)
        container.init.check_checkpoint()
        try:
            o = shimoptions.checkpoint_from_any(req.options.type_url, req.options.value)
        except ValueError as exc:
            raise status.invalid_argument(str(exc)) from exc
        image_path = req.path or o.image_path or container.options.criu_image_path
        if not image_path:
            raise status.invalid_argument("checkpoint needs an image path")
        # Without a work path criu works in a scratch dir, removed afterwards.
        work_path = o.work_path or container.options.criu_work_path
        scratch = not work_path
        if scratch:
            work_path = os.path.join(container.bundle, "work", "criu-work")
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
            await container.runc.checkpoint(container.id, opts)
        except RuncError as exc:
            dump_log = os.path.join(container.bundle, "criu-dump.log")
            with contextlib.suppress(OSError):
                shutil.copyfile(os.path.join(work_path, "dump.log"), dump_log)
            first_line = exc.message.splitlines()[0] if exc.message else "checkpoint failed"
            raise status.unknown(f"{first_line} path= {dump_log}") from exc
        finally:
            if scratch:
                shutil.rmtree(work_path, ignore_errors=True)
        self._publisher.publish(
            "/tasks/checkpointed",
            events.TaskCheckpointed(container_id=container.id, checkpoint=image_path),
        )
        return empty_pb2.Empty()

    @_uncancellable
    async def update(self, req: api.UpdateTaskRequest, ctx: RequestContext) -> empty_pb2.Empty:
        container = self._container(req.id)
        container.init.check_update()
        if req.resources.type_url.rsplit("/", 1)[-1] != "LinuxResources":
            raise status.invalid_argument(
                f"resources must be a LinuxResources, not {req.resources.type_url!r}"
            )
        try:
            resources = json.loads(req.resources.value)
            if not isinstance(resources, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise status.invalid_argument(f"invalid LinuxResources: {exc}") from exc
        try:
            await container.runc.update(container.id, json.dumps(resources).encode())
        except RuncError as exc:
            raise status.unknown(f"OCI runtime update failed: {exc.message}") from exc
        return empty_pb2.Empty()

    async def stats(self, req: api.StatsRequest, ctx: RequestContext) -> api.StatsResponse:
        container = self._container(req.id)
        if container.cgroup is None:
            raise status.not_found("cgroup does not exist")
        try:
            metrics = container.cgroup.stats()
        except cgroups.CgroupGone as exc:
            raise status.not_found("cgroup does not exist") from exc
        return api.StatsResponse(stats=pack(metrics))

    async def pids(self, req: api.PidsRequest, ctx: RequestContext) -> api.PidsResponse:
        container = self._container(req.id)
        init = container.init
        # containerd >= 1.7 deletes a reloaded shim whose Pids is empty or fails
        # ("cleaning leaked shim process"), container and all. An init that has
        # exited (reaped or not yet), or whose `runc ps` failed, still owes
        # containerd its exit: it is listed, as ps lists a zombie, until Delete.
        holds_init = init.pid > 0 and not (init.deleted or init.deleting)
        try:
            pids = await container.runc.ps(container.id)
        except RuncError as exc:
            if not holds_init:
                raise status.unknown(exc.message) from exc
            log.warning("Pids of %s: runc ps failed, listing the init only: %s", req.id, exc)
            pids = []
        if holds_init and init.pid not in pids:
            pids.insert(0, init.pid)
        exec_ids = {p.pid: p.exec_id for p in container.execs.values() if p.pid}
        processes = []
        for pid in pids:
            info = tasktypes.ProcessInfo(pid=pid)
            if pid in exec_ids:
                info.info.CopyFrom(pack(oci_pb2.ProcessDetails(exec_id=exec_ids[pid])))
            processes.append(info)
        return api.PidsResponse(processes=processes)

    async def connect(self, req: api.ConnectRequest, ctx: RequestContext) -> api.ConnectResponse:
        container = self.containers.get(req.id)
        if container is None and not self.containers and not self._creating:
            # An empty shim asked for a task: containerd died between `start` and
            # Create (or between Delete and Shutdown) and is loading us after its
            # restart. The Go shim answers pid 0 and containerd then keeps a task
            # nothing can delete, and the shim, forever; "not found" makes it clean
            # up (shim delete, bundle removed) and we go away.
            log.warning("connect for %s, but this shim runs no container: shutting down", req.id)
            self._shutdown_requested = True
            self._shutdown_if_idle()
            raise status.not_found("container not created")
        return api.ConnectResponse(
            shim_pid=os.getpid(), task_pid=container.init.pid if container else 0
        )

    async def shutdown(self, req: api.ShutdownRequest, ctx: RequestContext) -> empty_pb2.Empty:
        # With containers left this is a no-op, but remembered: containerd 2.x sends no
        # further Shutdown for a sandbox's containers, so the last Delete ends the shim.
        self._shutdown_requested = True
        self._shutdown_if_idle()
        return empty_pb2.Empty()

    def _shutdown_if_idle(self) -> None:
        if self._shutdown_requested and not self.containers and not self._creating:
            self._on_shutdown()
