"""Per-process state machine for a container's init and its execs.

created → running ⇄ paused → stopped → deleted (spec: task-api.md §2). The
transition checks raise the errors containerd expects (plain texts are
UNKNOWN, as the Go shim sends them); the container does the work in between.
"""

from __future__ import annotations

from enum import IntEnum

import trio
from google.protobuf import timestamp_pb2

from shimv2.console import ConsoleIO
from shimv2.stdio import PipeIO, StdioSpec
from shimv2.ttrpc import TTRPCError, status

# Go's zero time (0001-01-01T00:00:00Z): "has not exited" on the wire.
ZERO_TIME_NS = -62135596800 * 1_000_000_000


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


class Status(IntEnum):
    """containerd.v1.types.Status."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


_NAMES = {
    Status.CREATED: "created",
    Status.RUNNING: "running",
    Status.STOPPED: "stopped",
    Status.PAUSED: "paused",
    Status.PAUSING: "pausing",
}


class Process:
    def __init__(self, container_id: str, exec_id: str, stdio: StdioSpec) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.pid = 0
        self.status = Status.CREATED
        self.deleted = False
        # Set synchronously when a Start/Delete begins, so a concurrent second
        # call is refused instead of running runc twice.
        self.starting = False
        self.deleting = False
        # The reaper saw it exit; the exit may still be being handled (status
        # is set after the output is flushed). Nothing may signal or restart it.
        self.reaped = False
        self.exit_status = 0
        self.exited_at_ns: int | None = None
        self.exited = trio.Event()
        self.io: PipeIO | ConsoleIO | None = None
        self.spec_json = b""  # an exec's OCI Process, as containerd sent it
        self._stdin_close_requested = False

    @property
    def id(self) -> str:
        """The id events and State use: the container id for the init, else the exec id."""
        return self.exec_id or self.container_id

    @property
    def is_init(self) -> bool:
        return not self.exec_id

    @property
    def exited_at_or_zero(self) -> int:
        return ZERO_TIME_NS if self.exited_at_ns is None else self.exited_at_ns

    @property
    def state_name(self) -> str:
        if self.deleted or self.deleting:
            return "deleted"
        if self.reaped:
            return "stopped"
        if self.starting:
            return "running"
        return _NAMES.get(self.status, "unknown")

    def begin_start(self) -> None:
        """Check that Start may run and claim it; ``starting`` is reset by the caller."""
        if (
            self.deleted
            or self.deleting
            or self.starting
            or self.reaped
            or self.status != Status.CREATED
        ):
            raise status.unknown(f"cannot start a {self.state_name} process")
        self.starting = True

    def begin_delete(self) -> None:
        """Check that Delete may run and claim it; ``deleting`` is reset on failure."""
        if self.deleted or self.deleting:
            raise status.not_found("cannot delete a deleted process")
        if self.starting or self.status in (Status.RUNNING, Status.PAUSED, Status.PAUSING):
            raise status.unknown(f"cannot delete a {self.state_name} process")
        self.deleting = True

    def check_exec(self) -> None:
        """Exec, on the init: its container takes a new exec."""
        if self.state_name in ("deleted", "stopped", "paused", "pausing"):
            raise status.unknown(f"cannot exec in a {self.state_name} state")

    def check_exec_start(self) -> None:
        """Start of an exec, on the init: its container still runs."""
        if self.reaped or self.status == Status.STOPPED or self.deleted:
            raise status.failed_precondition(
                f"container {self.container_id} init process is not running"
            )

    def check_kill(self) -> None:
        if self.deleted:
            raise status.not_found("cannot kill a deleted process")
        if not self.is_init:
            if self.reaped or self.status == Status.STOPPED:
                raise status.not_found("process already finished")  # its pid may be reused
            if self.status == Status.CREATED or not self.pid:
                raise status.failed_precondition("process not created")

    def check_pause(self) -> None:
        if self.deleted:
            raise status.unknown("cannot pause a deleted process")
        if self.status == Status.CREATED:
            raise status.unknown("cannot pause task in created state")
        if self.status != Status.RUNNING:
            raise status.unknown(f"cannot pause a {self.state_name} container")

    def check_resume(self) -> None:
        if self.deleted:
            raise status.unknown("cannot resume a deleted process")
        if self.status == Status.CREATED:
            raise status.unknown("cannot resume task in created state")
        if self.status == Status.RUNNING:
            raise status.unknown("cannot resume a running process")
        if self.status != Status.PAUSED:
            raise status.unknown(f"cannot resume a {self.state_name} container")

    def check_checkpoint(self) -> None:
        if self.deleted:
            raise status.unknown("cannot checkpoint a deleted process")
        if self.status == Status.CREATED:
            raise status.unknown("cannot checkpoint a task in created state")
        if self.status == Status.STOPPED:
            raise status.unknown("cannot checkpoint a stopped container")

    def check_update(self) -> None:
        if self.deleted:
            raise status.unknown("cannot update a deleted process")
        if self.status == Status.STOPPED:
            raise status.unknown("cannot update a stopped container")

    def attach_io(self, io: PipeIO | ConsoleIO) -> None:
        self.io = io
        if self._stdin_close_requested:
            io.close_stdin()

    def resize_pty(self, width: int, height: int) -> None:
        if not self.is_init and self.status == Status.STOPPED:
            raise status.unknown("cannot resize a stopped container")
        if self.io is not None:
            try:
                self.io.resize(width, height)
            except OSError as exc:
                raise status.error_from_exception(exc) from exc

    def close_stdin(self) -> None:
        """CloseIO; remembered when it arrives before the stdio exists (exec Start race)."""
        self._stdin_close_requested = True
        if self.io is not None:
            self.io.close_stdin()

    def set_running(self, pid: int) -> None:
        self.pid = pid
        if self.status == Status.CREATED:
            self.status = Status.RUNNING

    def set_exited(self, exit_status: int, exited_at_ns: int) -> None:
        """Record the exit and release every Wait."""
        if self.exited.is_set():
            return
        self.status = Status.STOPPED
        self.exit_status = exit_status
        self.exited_at_ns = exited_at_ns
        self.exited.set()

    def mark_deleted(self) -> None:
        """Deleted without ever exiting (a created init): release waiters too."""
        self.deleted = True
        if not self.exited.is_set():
            self.status = Status.STOPPED
            self.exited.set()


async def close_io(*processes: Process) -> None:
    """Release the stdio of deleted processes; their binary loggers are stopped together."""
    ios = [p.io for p in processes if p.io is not None]
    for io in ios:
        io.close()
    loggers = [io for io in ios if io.has_logger]
    if loggers:  # most have none: no nursery then, and no pass of the scheduler
        async with trio.open_nursery() as nursery:
            for io in loggers:
                nursery.start_soon(io.shutdown_logger)


_ALREADY_FINISHED = ("os: process already finished", "container not running", "no such process")


def kill_error(exc: Exception) -> TTRPCError:
    """Map a failed kill to what containerd expects (NOT_FOUND means "already dead")."""
    text = str(exc).lower()
    if any(s in text for s in _ALREADY_FINISHED):
        return status.not_found("process already finished")
    if "does not exist" in text:
        return status.not_found("no such container")
    return status.unknown(f"unknown error after kill: {exc}")
