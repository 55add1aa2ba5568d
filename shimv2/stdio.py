"""Container stdio without a terminal (spec: io-and-reaping.md §1-3).

The container writes into anonymous pipes that runc hands to it; copy loops
move the bytes to what containerd's client gave us: FIFOs (held open O_RDWR,
so a restarting client causes neither EPIPE nor blocking opens), or plain
files. stdin flows the other way from its FIFO, kept alive by a writer of our
own that only ``CloseIO`` releases. No ``open()`` here can block the loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass
from urllib.parse import urlparse

import trio

from shimv2.ttrpc import status

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


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


def _open_output(uri: str) -> int:
    """Open the client end of an output stream without ever blocking."""
    scheme = urlparse(uri).scheme
    path = _output_target(uri)
    if scheme == "file":
        os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    st = os.stat(path)
    if stat.S_ISFIFO(st.st_mode):
        # O_RDWR never blocks and keeps a reader on the FIFO while the client is away.
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


def _close(fd: int) -> None:
    if fd >= 0:
        trio.lowlevel.notify_closing(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


async def pump(src: int, dst: int) -> None:
    """Copy ``src`` to ``dst`` until EOF on ``src``; closes both.

    If ``dst`` breaks (EPIPE) we keep draining ``src``: a container must never
    block on a stream nobody reads.
    """
    broken = False
    try:
        while True:
            try:
                data = os.read(src, _CHUNK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            view = memoryview(data)
            while view and not broken:
                try:
                    view = view[os.write(dst, view) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)
                except (BrokenPipeError, OSError) as exc:
                    log.warning("stdio copy: output closed (%s); discarding the rest", exc)
                    broken = True
    finally:
        _close(src)
        _close(dst)


class PipeIO:
    """Pipes for one process, and the copy loops between them and the client's ends."""

    def __init__(self, spec: StdioSpec, uid: int = 0, gid: int = 0) -> None:
        self.spec = spec
        self._runc_fds: dict[int, int | None] = {0: None, 1: None, 2: None}
        self._ours: list[int] = []  # container-side ends closed after runc started
        # (src, dst) pairs owned here until their copy loops start
        self._stdin_pump: tuple[int, int] | None = None
        self._output_pumps: list[tuple[int, int]] = []
        self._stdin_keepalive = -1
        self._stdin_close_requested = False
        self.output_done = trio.Event()
        try:
            self._setup(uid, gid)
        except BaseException:
            self.close()
            raise

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        self._ours += [r, w]
        return r, w

    def _setup(self, uid: int, gid: int) -> None:
        spec = self.spec
        if spec.stdin:
            fifo_r = os.open(spec.stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._stdin_keepalive = os.open(spec.stdin, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            r, w = self._pipe()
            os.fchown(r, uid, gid)
            self._runc_fds[0] = r
            self._ours.remove(w)
            os.set_blocking(w, False)  # our end only; the container's end stays blocking
            self._stdin_pump = (fifo_r, w)
        shared: dict[str, int] = {}
        for target, uri in ((1, spec.stdout), (2, spec.stderr)):
            if not uri:
                continue
            r, w = self._pipe()
            os.fchown(w, uid, gid)
            self._runc_fds[target] = w
            self._ours.remove(r)
            os.set_blocking(r, False)
            key = _output_target(uri)
            # stdout and stderr to one file share it (each loop owns a dup).
            dst = os.dup(shared[key]) if key in shared else _open_output(uri)
            os.set_inheritable(dst, False)
            shared.setdefault(key, dst)
            self._output_pumps.append((r, dst))
        if not self._output_pumps:
            self.output_done.set()

    def runc_fds(self) -> dict[int, int | None]:
        """fds 0-2 for runc (None: /dev/null)."""
        return dict(self._runc_fds)

    def close_after_start(self) -> None:
        """runc handed the container its ends: drop ours, or the loops never see EOF."""
        for fd in self._ours:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ours.clear()

    def start(self, nursery: trio.Nursery) -> None:
        """Start the copy loops in ``nursery`` (the owning container's)."""
        remaining = len(self._output_pumps)

        async def output(src: int, dst: int) -> None:
            nonlocal remaining
            try:
                await pump(src, dst)
            finally:
                remaining -= 1
                if remaining == 0:
                    self.output_done.set()

        if self._stdin_pump is not None:
            nursery.start_soon(pump, *self._stdin_pump)
            self._stdin_pump = None
        for src, dst in self._output_pumps:
            nursery.start_soon(output, src, dst)
        self._output_pumps.clear()

    def close_stdin(self) -> None:
        """CloseIO: drop our keep-alive writer so stdin ends when the client's writer does."""
        self._stdin_close_requested = True
        if self._stdin_keepalive >= 0:
            with contextlib.suppress(OSError):
                os.close(self._stdin_keepalive)
            self._stdin_keepalive = -1

    async def wait_output(self, timeout: float) -> bool:
        """Wait until stdout/stderr are fully copied; False on timeout."""
        with trio.move_on_after(timeout):
            await self.output_done.wait()
        return self.output_done.is_set()

    def close(self) -> None:
        """Release everything not owned by a running copy loop."""
        self.close_after_start()
        pending = [*self._output_pumps, *([self._stdin_pump] if self._stdin_pump else [])]
        for src, dst in pending:
            for fd in (src, dst):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._output_pumps.clear()
        self._stdin_pump = None
        self.close_stdin()
