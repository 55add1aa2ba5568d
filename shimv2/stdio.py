"""Container stdio without a terminal (spec: io-and-reaping.md §1-3).

The container writes into anonymous pipes that runc hands to it; copy loops
move the bytes to what containerd's client gave us: FIFOs (held open O_RDWR,
so a restarting client causes neither EPIPE nor blocking opens), or plain
files. stdin flows the other way from its FIFO, kept alive by a writer of our
own that only ``CloseIO`` releases. No ``open()`` here can block the loop.
While nobody reads an output FIFO the copy loop spools into the bundle instead
of letting the container block (:mod:`shimv2.spool`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlparse

import trio

from shimv2 import tracing
from shimv2.reaper import Child
from shimv2.spool import Progress, Sink, Spool, SpoolConfig, ended_empty
from shimv2.tasks import Spawner
from shimv2.ttrpc import status

log = logging.getLogger(__name__)

_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


@dataclass(frozen=True)
class StdioSpec:
    """The stdio URIs of a process, as containerd sent them."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    @property
    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


def _output_target(uri: str) -> str:
    """The filesystem path for a stdout/stderr URI; raises for what we cannot serve."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "fifo"):
        return uri if parsed.scheme == "" else parsed.path
    if parsed.scheme == "file":
        return parsed.path
    raise status.invalid_argument(f"unknown STDIO scheme {parsed.scheme}")


def open_output(uri: str) -> int:
    """Open the client end of an output stream without ever blocking. (Every open
    of a client's path has O_NOCTTY: a daemon from the fork server leads its own
    session, and a terminal it opened would become its controlling tty.)"""
    scheme = urlparse(uri).scheme
    path = _output_target(uri)
    if scheme == "file":
        os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY
        return os.open(path, flags, 0o644)
    st = os.stat(path)
    if stat.S_ISFIFO(st.st_mode):
        # O_RDWR never blocks and keeps a reader on the FIFO while the client is away.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        # A 64 KiB FIFO wakes its reader 16x as often as a 1 MiB one: pipe stdout
        # went from ~750 to ~2800 MiB/s here.
        _enlarge(fd)
        return fd
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOCTTY)


def close_fd(fd: int) -> None:
    """Close an fd trio may be waiting on (waiters are woken, not left hanging)."""
    if fd >= 0:
        trio.lowlevel.notify_closing(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


async def pump(
    src: int,
    dst: int,
    spool: Spool | None = None,
    progress: Progress | None = None,
    *,
    drain: bool = True,
) -> None:
    """Copy ``src`` (a pipe or FIFO) to ``dst`` until EOF on ``src`` and (``drain``)
    until the reader of a FIFO ``dst`` has taken it all; closes both.

    splice(2) moves the bytes without copying them through Python; where it
    cannot (an O_APPEND file) plain read/write does. With a ``spool``, a ``dst``
    that takes nothing for a while (a FIFO nobody reads) does not stop the
    draining of ``src``: see :mod:`shimv2.spool`. If ``dst`` fails we keep
    draining ``src``: a container must never block on a stream nobody reads.
    """
    if progress is not None:
        progress.sources.add(src)
    try:
        sink = Sink(dst, spool, spool.label if spool else "stdio copy", progress, drain=drain)
        await sink.run(lambda sink: sink.splice_from(src))
    finally:
        if progress is not None:
            progress.sources.discard(src)
        close_fd(src)
        close_fd(dst)


def _enlarge(fd: int) -> None:
    """Bigger pipe buffers mean fewer wake-ups per byte; best effort."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


@dataclass(frozen=True)
class LoggerContext:
    """What a ``binary://`` logger needs from the shim (spec: io-and-reaping.md §5)."""

    spawn: Callable[..., Child]  # Reaper.spawn: the logger is reaped like any child
    process_id: str  # CONTAINER_ID: the container id for the init, else the exec id
    namespace: str


def logger_argv(uri: str) -> list[str]:
    """``binary:///path?k=v&flag`` → ``[path, k, v, flag]``."""
    parsed = urlparse(uri)
    if not parsed.path:
        raise status.invalid_argument(f"binary log URI {uri!r} names no program")
    argv = [parsed.path]
    for key, value in parse_qsl(parsed.query, keep_blank_values=True):
        argv += [key, value] if value else [key]
    return argv


class BinaryLogger:
    """A ``binary://`` logger: it reads the process's output pipes itself.

    Started before the container (its fds: 3 = stdout pipe, 4 = stderr pipe,
    5 = readiness), reaped by our reaper; we keep the pipes' write ends until
    :meth:`close`, so it sees EOF only when the process is deleted.
    """

    def __init__(self, uri: str, ctx: LoggerContext, uid: int = 0, gid: int = 0) -> None:
        argv = logger_argv(uri)
        self.stdout_fd = self.stderr_fd = self._ready_fd = -1
        self._child: Child | None = None
        # Its start-up, until it said it is ready; it gets the span's TRACEPARENT.
        self._span = tracing.start_span(f"logger {os.path.basename(argv[0])}", **{"log.uri": uri})
        theirs: list[int] = []
        try:
            out_r, self.stdout_fd = os.pipe2(os.O_CLOEXEC)
            theirs.append(out_r)
            err_r, self.stderr_fd = os.pipe2(os.O_CLOEXEC)
            theirs.append(err_r)
            self._ready_fd, ready_w = os.pipe2(os.O_CLOEXEC)
            theirs.append(ready_w)
            for fd in (self.stdout_fd, self.stderr_fd):
                os.fchown(fd, uid, gid)
            env = {"CONTAINER_ID": ctx.process_id, "CONTAINER_NAMESPACE": ctx.namespace}
            env.update(self._span.env)
            try:
                self._child = ctx.spawn(argv, env=env, fds={3: out_r, 4: err_r, 5: ready_w})
            except OSError as exc:
                raise status.unknown(f"failed to start logging binary {argv[0]}: {exc}") from exc
        except BaseException as exc:
            self._span.end(exc)
            self.close()
            raise
        finally:
            for fd in theirs:  # the logger has its own copies now
                os.close(fd)

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until it says it is ready: a byte on fd 5, or closing it."""
        if self._ready_fd < 0:
            return
        span, self._span = self._span, tracing.NO_SPAN
        with span:
            await self._wait_ready(timeout)

    async def _wait_ready(self, timeout: float) -> None:
        fd, self._ready_fd = self._ready_fd, -1
        async with trio.lowlevel.FdStream(fd) as stream:
            with trio.move_on_after(timeout) as scope:
                signalled = bool(await stream.receive_some(1))
        if scope.cancelled_caught:
            raise status.unknown(f"logging binary did not become ready within {timeout:.0f}s")
        child = self._child
        assert child is not None
        if not signalled:
            # EOF: it closed fd 5 on purpose, or it died; give a dying one a moment.
            with trio.move_on_after(0.05):
                await child.wait()
        if child.exit is not None:
            raise status.unknown(
                f"logging binary exited with status {child.exit.status} before the container "
                "started"
            )

    def close(self) -> None:
        """Close our write ends: the logger sees EOF once the container's are gone too."""
        self._span.end()
        for fd in (self.stdout_fd, self.stderr_fd, self._ready_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.stdout_fd = self.stderr_fd = self._ready_fd = -1

    async def shutdown(self, timeout: float = 12.0) -> None:
        """After close(): SIGTERM the logger, SIGKILL it if it lingers."""
        child = self._child
        if child is None or child.exit is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGTERM)
        with trio.move_on_after(timeout):
            await child.wait()
        if child.exit is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)


async def _either(first: trio.Event, second: trio.Event) -> None:
    """Wait until one of the two events is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, first)
        nursery.start_soon(wait, second)


def open_stdin(path: str) -> tuple[int, int]:
    """The stdin FIFO's reader and our keep-alive writer; neither open can block.

    The reader opens at once (O_NONBLOCK) and makes the writer's open succeed;
    while our writer lives, a client that goes away is not an EOF.
    """
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        return reader, os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        os.close(reader)
        raise


class StdioBase:
    """What pipe and console stdio share: stdin's keep-alive writer and the end of output."""

    def __init__(self, spec: StdioSpec) -> None:
        self.spec = spec
        self.output_done = trio.Event()
        self.progress = Progress()  # of the output towards its reader
        self._stdin_keepalive = -1
        self._logger: BinaryLogger | None = None  # binary://: it reads the output itself

    @property
    def has_logger(self) -> bool:
        return self._logger is not None

    def close_stdin(self) -> None:
        """CloseIO: drop our keep-alive writer so stdin ends when the client's writer does."""
        if self._stdin_keepalive >= 0:
            with contextlib.suppress(OSError):
                os.close(self._stdin_keepalive)
            self._stdin_keepalive = -1

    async def wait_output(self, idle: float) -> bool:
        """Wait until the output's reader has had all of it, for as long as the output
        moves; False once nothing moved for ``idle`` seconds (a reader that takes
        nothing). A slow reader that keeps taking gets every byte first: an attached
        ``ctr`` closes its FIFOs as soon as it learns the exit status. Output that
        has no end (an orphan still writes) gets ``idle`` seconds in all. What waits
        in FIFOs that no reader has open (``ctr run -d``) is not waited for: True.
        """
        start = trio.current_time()
        progress = self.progress
        while not self.output_done.is_set():
            if progress.nobody_reads:
                return True  # delivery goes on while the process exists
            moved = progress.last if progress.finite else start
            deadline = max(start, moved) + idle
            if trio.current_time() >= deadline:
                return False
            with trio.move_on_at(deadline):
                await _either(self.output_done, progress.changed)
        return True


class PipeIO(StdioBase):
    """Pipes for one process, and the copy loops between them and the client's ends.

    The stdio interface the service uses, shared with
    :class:`~shimv2.console.ConsoleIO`: ``ready`` (before runc), ``runc_fds`` and
    ``console_socket`` (for runc), ``runc_started`` (after runc), ``start`` (copy
    loops), ``close_stdin``, ``resize``, ``process_exited``, ``wait_output``,
    ``close`` and ``shutdown_logger``.
    """

    console_socket = ""  # pipes need no console

    def __init__(
        self,
        spec: StdioSpec,
        uid: int = 0,
        gid: int = 0,
        *,
        logger: LoggerContext | None = None,
        spool: SpoolConfig | None = None,
    ) -> None:
        super().__init__(spec)
        self._runc_fds: dict[int, int | None] = {0: None, 1: None, 2: None}
        self._ours: list[int] = []  # container-side ends closed after runc started
        # (src, dst[, spool]) owned here until their copy loops start
        self._stdin_pump: tuple[int, int] | None = None
        self._output_pumps: list[tuple[int, int, Spool | None]] = []
        self._spool = spool  # None: no spooling, a FIFO nobody reads blocks the container
        self._scopes: list[trio.CancelScope] = []  # of the running copy loops
        try:
            self._setup(uid, gid, logger)
        except BaseException:
            self.close()
            raise

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        self._ours += [r, w]
        return r, w

    def _setup(self, uid: int, gid: int, logger: LoggerContext | None) -> None:
        spec = self.spec
        if spec.stdin:
            fifo_r, self._stdin_keepalive = open_stdin(spec.stdin)
            r, w = self._pipe()
            os.fchown(r, uid, gid)
            self._runc_fds[0] = r
            self._ours.remove(w)
            os.set_blocking(w, False)  # our end only; the container's end stays blocking
            self._stdin_pump = (fifo_r, w)
        if urlparse(spec.stdout).scheme == "binary":
            if logger is None:
                raise status.invalid_argument("binary log URIs are not supported here")
            self._logger = BinaryLogger(spec.stdout, logger, uid, gid)
            self._runc_fds[1] = self._logger.stdout_fd
            self._runc_fds[2] = self._logger.stderr_fd
            self.output_done.set()  # nothing for us to copy
            return
        shared: dict[str, int] = {}
        for target, stream, uri in ((1, "stdout", spec.stdout), (2, "stderr", spec.stderr)):
            if not uri:
                continue
            key = _output_target(uri)
            # stdout and stderr to one file share it (each loop owns a dup).
            dst = os.dup(shared[key]) if key in shared else open_output(uri)
            shared.setdefault(key, dst)
            try:
                r, w = self._pipe()
            except OSError:
                os.close(dst)
                raise
            self._ours.remove(r)
            spool = self._spool.spool(stream) if self._spool is not None else None
            self._output_pumps.append((r, dst, spool))  # owned by close() from here on
            os.fchown(w, uid, gid)
            self._runc_fds[target] = w
            os.set_blocking(r, False)
            _enlarge(r)  # and open_output enlarged a FIFO
        if not self._output_pumps:
            self.output_done.set()

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait for a ``binary://`` logger to be ready; nothing to wait for otherwise."""
        if self._logger is not None:
            await self._logger.ready(timeout)

    async def shutdown_logger(self, timeout: float = 12.0) -> None:
        """After close(): stop a ``binary://`` logger."""
        if self._logger is not None:
            await self._logger.shutdown(timeout)

    def runc_fds(self) -> dict[int, int | None]:
        """fds 0-2 for runc (None: /dev/null)."""
        return dict(self._runc_fds)

    async def runc_started(self) -> None:
        """runc handed the container its ends of the pipes."""
        self.close_after_start()

    def resize(self, width: int, height: int) -> None:
        """No pty, nothing to resize."""

    def process_exited(self) -> None:
        """Pipes end by themselves when the last writer is gone."""

    def close_after_start(self) -> None:
        """Drop our copies of the container's ends, or the loops never see EOF."""
        for fd in self._ours:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ours.clear()

    def start(self, nursery: Spawner) -> None:
        """Start the copy loops in ``nursery`` (the owning container's); close() stops them."""
        remaining = len(self._output_pumps)

        async def copy(src: int, dst: int, output: bool, spool: Spool | None = None) -> None:
            nonlocal remaining
            scope = trio.CancelScope()
            self._scopes.append(scope)
            try:
                with scope:
                    if output:
                        await pump(src, dst, spool, self.progress)
                    else:  # stdin: the container's pipe; EOF may follow the data
                        await pump(src, dst, drain=False)
            finally:
                if output:
                    remaining -= 1
                    if remaining == 0:
                        self.output_done.set()

        if self._stdin_pump is not None:
            nursery.start_soon(copy, *self._stdin_pump, False)
            self._stdin_pump = None
        for src, dst, spool in self._output_pumps:
            if ended_empty(src):
                # A short exec is often gone by now: nothing to copy, no loop to run.
                if spool is not None:
                    spool.close()
                for fd in (src, dst):  # never waited on: no notify_closing
                    with contextlib.suppress(OSError):
                        os.close(fd)
                remaining -= 1
                continue
            nursery.start_soon(copy, src, dst, True, spool)
        self._output_pumps.clear()
        if remaining == 0:
            self.output_done.set()

    def close(self) -> None:
        """Delete: stop the copy loops (they close their fds) and release the rest."""
        for scope in self._scopes:
            scope.cancel()
        self.close_after_start()
        pending = [(s, d) for s, d, _ in self._output_pumps]
        pending += [self._stdin_pump] if self._stdin_pump else []
        for src, dst in pending:
            for fd in (src, dst):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._output_pumps.clear()
        self._stdin_pump = None
        if self._logger is not None:
            self._logger.close()
        self.close_stdin()
