"""The Task service: one method per RPC (spec: task-api.md §3).

Handlers validate, find the container and process, drive runc, and publish
events. Exits that race a Create/Start are held by the exit matcher
(:mod:`shimv2.exits`) until the start event is published, so ``/tasks/exit``
never precedes ``/tasks/start``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import trio
from google.protobuf import empty_pb2

from shimv2 import options as shimoptions
from shimv2 import tracing
from shimv2.api.containerd.events import task_pb2 as events
from shimv2.api.containerd.runc.options import oci_pb2
from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.api.containerd.types.task import task_pb2 as tasktypes
from shimv2.container import Container, prepare_bundle
from shimv2.events import Publisher, pack
from shimv2.exits import ExitMatcher, ExitSubscriber
from shimv2.mount import Mount
from shimv2.process import Process, timestamp
from shimv2.reaper import Reaper
from shimv2.stdio import StdioSpec
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
                linux = prepare_bundle(req.bundle, req.id, opts)
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
        container = Container(
            req.id, req.bundle, self.namespace, opts, init, linux, self._reaper, self._publisher
        )
        mounts = [Mount(m.type, m.source, tuple(m.options)) for m in req.rootfs]
        await container.mount_rootfs(mounts)
        subscriber = self._exits.subscribe()
        try:
            await container.create(self._nursery, req.checkpoint, req.parent_checkpoint)
        except BaseException:
            self._exits.unsubscribe(subscriber)
            raise
        return container, subscriber

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
            await container.start_init()
            process.set_running(process.pid)
            self._publisher.publish(
                "/tasks/start", events.TaskStart(container_id=container.id, pid=process.pid)
            )
        finally:  # also after a failed start: its process may have run, and exited
            self._exits.started(container, process, subscriber)
        return api.StartResponse(pid=process.pid)

    async def _start_exec(self, container: Container, process: Process) -> api.StartResponse:
        container.init.check_exec_start()
        container.exec_started()
        subscriber = self._exits.subscribe()
        try:
            await container.start_exec(process)
        except BaseException:
            self._exits.unsubscribe(subscriber)
            container.exec_failed(process, self._nursery)
            raise
        self._publisher.publish(
            "/tasks/exec-started",
            events.TaskExecStarted(
                container_id=container.id, exec_id=process.exec_id, pid=process.pid
            ),
        )
        self._exits.started(container, process, subscriber)
        return api.StartResponse(pid=process.pid)

    def exec(self, req: api.ExecProcessRequest, ctx: RequestContext) -> empty_pb2.Empty:
        validate_id(req.exec_id, "exec id")
        container = self._container(req.id)
        if req.exec_id in container.execs:
            raise status.already_exists(f"id {req.exec_id}")
        container.init.check_exec()
        try:
            spec = json.loads(req.spec.value)
            if not isinstance(spec, dict) or not spec.get("args"):
                raise ValueError("the process has no args")
        except ValueError as exc:
            raise status.invalid_argument(f"invalid exec process spec: {exc}") from exc
        stdio = StdioSpec(req.stdin, req.stdout, req.stderr, req.terminal)
        container.add_exec(req.exec_id, stdio, req.spec.value)
        self._publisher.publish(
            "/tasks/exec-added",
            events.TaskExecAdded(container_id=container.id, exec_id=req.exec_id),
        )
        return empty_pb2.Empty()

    def close_io(self, req: api.CloseIORequest, ctx: RequestContext) -> empty_pb2.Empty:
        _, process = self._process(req.id, req.exec_id)
        if req.stdin:
            process.close_stdin()
        return empty_pb2.Empty()

    def resize_pty(self, req: api.ResizePtyRequest, ctx: RequestContext) -> empty_pb2.Empty:
        _, process = self._process(req.id, req.exec_id)
        process.resize_pty(req.width, req.height)
        return empty_pb2.Empty()

    @_uncancellable
    async def delete(self, req: api.DeleteRequest, ctx: RequestContext) -> api.DeleteResponse:
        container, process = self._process(req.id, req.exec_id)
        process.begin_delete()
        try:
            await container.wait_output(process)
            if process.is_init:
                await self._delete_container(container)
        except BaseException:
            process.deleting = False
            raise
        if not process.is_init:
            await container.delete_exec(process)
        return api.DeleteResponse(
            pid=process.pid,
            exit_status=process.exit_status,
            exited_at=timestamp(process.exited_at_or_zero),
        )

    async def _delete_container(self, container: Container) -> None:
        init = container.init
        await container.delete()
        self._exits.forget(init)
        await container.release()
        self.containers.pop(container.id, None)
        unmount_error = await container.unmount_rootfs()
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

    def state(self, req: api.StateRequest, ctx: RequestContext) -> api.StateResponse:
        container, process = self._process(req.id, req.exec_id)
        state = container.reported_status(process)
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
        await container.kill(process, req.signal, req.all)
        return empty_pb2.Empty()

    @_uncancellable
    async def pause(self, req: api.PauseRequest, ctx: RequestContext) -> empty_pb2.Empty:
        container = self._container(req.id)
        await container.pause()
        self._publisher.publish("/tasks/paused", events.TaskPaused(container_id=container.id))
        return empty_pb2.Empty()

    @_uncancellable
    async def resume(self, req: api.ResumeRequest, ctx: RequestContext) -> empty_pb2.Empty:
        container = self._container(req.id)
        await container.resume()
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
        image_path = await container.checkpoint(req.path, o)
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
        await container.update(resources)
        return empty_pb2.Empty()

    def stats(self, req: api.StatsRequest, ctx: RequestContext) -> api.StatsResponse:
        container = self._container(req.id)
        return api.StatsResponse(stats=pack(container.stats()))

    async def pids(self, req: api.PidsRequest, ctx: RequestContext) -> api.PidsResponse:
        container = self._container(req.id)
        processes = []
        for pid, exec_id in await container.pids():
            info = tasktypes.ProcessInfo(pid=pid)
            if exec_id:
                info.info.CopyFrom(pack(oci_pb2.ProcessDetails(exec_id=exec_id)))
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
