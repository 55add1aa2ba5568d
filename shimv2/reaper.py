"""The one owner of ``wait4()`` (spec: io-and-reaping.md §7).

The daemon is a child subreaper: container processes are re-parented to it
when runc exits. Every child, runc and container alike, is reaped here; no
other code may wait on a pid (``subprocess`` would get ECHILD and report 0).

Children the shim starts itself go through :meth:`Reaper.spawn`, which forks
and registers in one synchronous step, so no exit can slip in between.
Every exit, known pid or not, is also handed to the listeners (the service
matches container processes there).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

# Inherited signal dispositions a child should not keep: Python ignores SIGPIPE,
# and a containerd started from a background shell or nohup hands us SIGINT,
# SIGQUIT or SIGHUP ignored, which runc would pass on to the containers.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int  # exit code, or 128 + signal number
    timestamp_ns: int


def exit_status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


@dataclass
class Child:
    """A process spawned through the reaper; its exit arrives in ``exit``."""

    pid: int
    exit: Exit | None = None
    _done: trio.Event = field(default_factory=trio.Event)

    async def wait(self) -> int:
        await self._done.wait()
        assert self.exit is not None
        return self.exit.status


ExitListener = Callable[[Exit], None]


class Reaper:
    def __init__(self) -> None:
        self._children: dict[int, Child] = {}
        self._programs: dict[tuple[str, str], str] = {}  # (name, PATH) -> path
        self._listeners: list[ExitListener] = []
        self.reaped = 0  # exits collected since start (metrics, debug view)

    def subscribe(self, listener: ExitListener) -> None:
        """Call ``listener`` synchronously for every exit, in reaping order."""
        self._listeners.append(listener)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        fds: Mapping[int, int | None] | None = None,
    ) -> Child:
        """Start ``argv`` with ``fds`` as its {child fd: our fd} (None or absent 0-2: /dev/null).

        Raises OSError (e.g. FileNotFoundError) if the program cannot be executed;
        glibc's posix_spawn has then already collected the failed child.
        """
        sources = {target: fd for target, fd in (fds or {}).items() if fd is not None}
        actions: list[tuple] = []
        for target in (0, 1, 2):
            if target not in sources:
                flags = os.O_RDONLY if target == 0 else os.O_WRONLY
                actions.append((os.POSIX_SPAWN_OPEN, target, os.devnull, flags, 0))
        # dup2 onto a target that is another entry's source would clobber it:
        # give every source a fresh close-on-exec copy above all targets first.
        floor = max(sources, default=2) + 1
        copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in sources.values()]
        actions += [(os.POSIX_SPAWN_DUP2, c, t) for c, t in zip(copies, sources, strict=True)]
        program = self._resolve(argv[0], env.get("PATH", os.defpath))
        spawn = os.posix_spawn if "/" in program else os.posix_spawnp
        try:
            pid = spawn(
                program, list(argv), dict(env), file_actions=actions, setsigdef=_RESET_SIGNALS
            )
        finally:
            for c in copies:
                os.close(c)
        child = Child(pid)
        self._children[pid] = child
        return child

    @property
    def children(self) -> list[int]:
        """Pids spawned here and not reaped yet (runc, loggers)."""
        return list(self._children)

    def _resolve(self, program: str, path: str) -> str:
        """Where ``program`` is on ``path``, looked up once: posix_spawnp would try
        every PATH entry in each child (four failed execs before runc, here)."""
        if "/" in program:
            return program
        found = self._programs.get((program, path))
        if found is None or not os.access(found, os.X_OK):  # first time, or it moved
            found = shutil.which(program, path=path) or program  # not found: spawnp says so
            self._programs[(program, path)] = found
        return found

    def reap(self) -> list[Exit]:
        """Collect every exited child now; route each exit. Returns them (for tests)."""
        exits = []
        while True:
            try:
                pid, status, _ = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exits.append(Exit(pid, exit_status(status), time.time_ns()))
        self.reaped += len(exits)
        for e in exits:
            log.debug("reaped pid %d status %d", e.pid, e.status)
            child = self._children.pop(e.pid, None)
            if child is not None:
                child.exit = e
                child._done.set()
            for listener in self._listeners:
                try:
                    listener(e)
                except Exception:
                    log.exception("exit listener failed for pid %d", e.pid)
        return exits

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reap on every SIGCHLD (they coalesce, so each one drains everything)."""
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            self.reap()
            async for _ in signals:
                self.reap()
