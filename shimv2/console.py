"""Terminal stdio: the console socket and the pty copy loops (spec: io-and-reaping.md §4).

runc allocates the pty inside the container and sends us its master over a
unix socket we name with ``--console-socket``. :class:`ConsoleIO` then moves
bytes between the master and the client's FIFOs (or a ``file://`` log), with
the same interface :class:`~shimv2.stdio.PipeIO` offers, so the service treats
both alike.

The master needs care: a read returns EIO whenever no slave fd is open (the
container has not opened its tty yet, or it has just exited). That is not the
end of the output: we retry after a short pause until the process's exit has
been reaped (:meth:`ConsoleIO.process_exited`), and only then drain what is
left and stop. Nothing written before the exit is lost: once the exit is
known, every byte the kernel still holds is read before the stream ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import termios
from urllib.parse import urlparse

import trio

from shimv2.spool import Sink, SpoolConfig
from shimv2.stdio import (
    BinaryLogger,
    LoggerContext,
    StdioBase,
    StdioSpec,
    close_fd,
    open_output,
    open_stdin,
)
from shimv2.tasks import Spawner
from shimv2.ttrpc import status

log = logging.getLogger(__name__)

RECEIVE_TIMEOUT = 30.0
_CHUNK = 1 << 16
_BATCH = 1 << 18  # read at most this much from the master before writing it out
# Pause between reads of a master without an open slave (EIO): 10 ms, growing to 50 ms.
_HUP_PAUSE_MIN = 0.01
_HUP_PAUSE_MAX = 0.05


def _console_error(text: str) -> Exception:
    return status.unknown(f"failed to receive the console master: {text}")


class ConsoleSocket:
    """A listening unix socket in a private temp dir, for ``runc --console-socket``.

    :meth:`receive` takes exactly one fd from exactly one connection; the socket
    and its directory are removed afterwards, and by :meth:`close` on any other path.
    """

    def __init__(self) -> None:
        runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
        self.dir = tempfile.mkdtemp(prefix="pty", dir=runtime_dir or None)  # mode 0700
        self.path = os.path.join(self.dir, "pty.sock")
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock = sock
            sock.setblocking(False)
            sock.bind(self.path)
            if runtime_dir:
                os.chmod(self.path, 0o755 | stat.S_ISVTX)  # as go-runc does there
            sock.listen(1)
        except BaseException:
            self.close()
            raise

    async def receive(self, timeout: float = RECEIVE_TIMEOUT) -> int:
        """The fd runc sends (close-on-exec); raises UNKNOWN on timeout or a bad message."""
        try:
            with trio.fail_after(timeout):
                conn = await self._accept()
                try:
                    return await self._receive_fd(conn)
                finally:
                    conn.close()
        except trio.TooSlowError:
            raise _console_error(f"runc sent nothing within {timeout:g}s") from None
        except trio.ClosedResourceError:
            raise _console_error("the console socket was closed") from None
        finally:
            self.close()

    async def _accept(self) -> socket.socket:
        sock = self._sock
        while True:
            if sock is None:
                raise trio.ClosedResourceError
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            conn.setblocking(False)
            return conn

    @staticmethod
    async def _receive_fd(conn: socket.socket) -> int:
        while True:
            try:
                # socket.recv_fds ignores its flags argument: no MSG_CMSG_CLOEXEC,
                # so the fd is made close-on-exec below, before any await.
                data, fds, flags, _ = socket.recv_fds(conn, 4096, 1)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
                continue
            break
        for fd in fds:
            os.set_inheritable(fd, False)
        if flags & socket.MSG_CTRUNC or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if not data and not fds:
                raise _console_error("the connection closed without sending a console")
            count = "more than one" if flags & socket.MSG_CTRUNC else str(len(fds))
            raise _console_error(f"expected exactly one fd, got {count}")
        log.debug("console master received (%s)", data.decode(errors="replace"))
        return fds[0]

    def close(self) -> None:
        """Stop listening and remove the socket and its directory; idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ConsoleIO(StdioBase):
    """A process's pty (from runc over the console socket) and its copy loops.

    Same interface as :class:`~shimv2.stdio.PipeIO`, plus :attr:`console_socket`,
    :meth:`receive_master`, :meth:`resize` and :meth:`process_exited`.
    """

    def __init__(
        self,
        spec: StdioSpec,
        logger: LoggerContext | None = None,
        spool: SpoolConfig | None = None,
    ) -> None:
        super().__init__(spec)
        self._spool = spool  # for the stdout FIFO: None blocks the tty while nobody reads
        self._exited = trio.Event()
        self._master = -1  # owned here until close(); loops read it through self
        self._stdout = -1  # owned here until the output loop takes it
        self._stdin = -1  # likewise for the stdin loop
        self._socket: ConsoleSocket | None = None
        self.console_socket = ""  # the path for runc's --console-socket
        self._scopes: list[trio.CancelScope] = []
        self._wake: trio.CancelScope | None = None  # a loop waiting for the master
        self._started = False
        self._closed = False
        try:
            self._setup(logger)
        except BaseException:
            self.close()
            raise

    def _setup(self, logger: LoggerContext | None) -> None:
        spec = self.spec
        if urlparse(spec.stdout).scheme == "binary":
            if logger is None:
                raise status.invalid_argument("binary log URIs are not supported here")
            # The pty's output goes to the logger's stdout pipe; its stderr stays unused.
            self._logger = BinaryLogger(spec.stdout, logger)
            self._stdout = os.dup(self._logger.stdout_fd)
            os.set_blocking(self._stdout, False)
        elif spec.stdout:
            self._stdout = open_output(spec.stdout)  # a FIFO: O_RDWR | O_NONBLOCK
        if spec.stdin:
            self._stdin, self._stdin_keepalive = open_stdin(spec.stdin)
        self._socket = ConsoleSocket()
        self.console_socket = self._socket.path

    # -- the PipeIO interface ---------------------------------------------------

    async def ready(self, timeout: float = RECEIVE_TIMEOUT) -> None:
        """Wait for a ``binary://`` logger to be ready; nothing to wait for otherwise."""
        if self._logger is not None:
            await self._logger.ready(timeout)

    async def shutdown_logger(self, timeout: float = 12.0) -> None:
        """After close(): stop a ``binary://`` logger."""
        if self._logger is not None:
            await self._logger.shutdown(timeout)

    def runc_fds(self) -> dict[int, int | None]:
        """runc's own stdio is /dev/null: the container gets the pty's slave."""
        return {0: None, 1: None, 2: None}

    def close_after_start(self) -> None:
        """No container-side fds of ours to drop (the slave never passes through here)."""

    async def runc_started(self) -> None:
        """runc created the process: take the pty master it sends us."""
        self.close_after_start()
        await self.receive_master()

    async def receive_master(self, timeout: float = RECEIVE_TIMEOUT) -> None:
        """After ``runc create``/``exec`` returned: take the pty master runc sent."""
        sock = self._socket
        if sock is None:
            raise _console_error("the console socket is gone")
        try:
            master = await sock.receive(timeout)
        finally:
            self._socket = None
        if self._closed:
            os.close(master)
            raise _console_error("the process's stdio was closed")
        os.set_blocking(master, False)
        self._master = master

    def start(self, nursery: Spawner) -> None:
        """Start the copy loops in ``nursery`` (the owning container's); they own their fds."""
        if self._master < 0:
            raise RuntimeError("ConsoleIO.start before receive_master")
        self._started = True
        out_scope, stdout, self._stdout = trio.CancelScope(), self._stdout, -1
        self._scopes.append(out_scope)
        nursery.start_soon(self._output_loop, out_scope, stdout)
        if self._stdin >= 0:
            in_scope, stdin, self._stdin = trio.CancelScope(), self._stdin, -1
            self._scopes.append(in_scope)
            nursery.start_soon(self._stdin_loop, in_scope, stdin)

    def close(self) -> None:
        """Delete: stop the loops, close the master and everything else; idempotent."""
        self._closed = True
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        for scope in self._scopes:
            scope.cancel()
        master, self._master = self._master, -1
        close_fd(master)
        for name in ("_stdout", "_stdin"):  # not taken by a loop
            fd = getattr(self, name)
            setattr(self, name, -1)
            close_fd(fd)
        self.close_stdin()
        if self._logger is not None:
            self._logger.close()
        if not self._started:
            self.output_done.set()

    # -- terminal specifics -----------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        """ResizePty: TIOCSWINSZ on the master (ws_row = height, ws_col = width)."""
        if self._master < 0:
            return
        winsize = struct.pack("HHHH", height & 0xFFFF, width & 0xFFFF, 0, 0)
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, winsize)

    def process_exited(self) -> None:
        """The process's exit was reaped: the output ends once the master is drained."""
        self._exited.set()
        if self._wake is not None:
            self._wake.cancel()

    # -- copy loops -------------------------------------------------------------

    async def _output_loop(self, scope: trio.CancelScope, dst: int) -> None:
        # A binary:// logger's pipe is read by the logger itself, never spooled.
        spool = None
        if self._spool is not None and self._logger is None:
            spool = self._spool.spool("stdout")
        sink = Sink(dst, spool, spool.label if spool else "terminal output", self.progress)
        try:
            with scope:
                await sink.run(self._copy_output)
        except trio.ClosedResourceError:
            pass  # close() took the master away
        except Exception:
            log.exception("terminal output copy failed")
        finally:
            close_fd(dst)
            self.output_done.set()

    async def _copy_output(self, out: Sink) -> None:
        """master → ``out`` until the master is drained after the exit (or closed)."""
        pause = _HUP_PAUSE_MIN
        while True:
            exited = self._exited.is_set()  # before reading: what was written is readable
            master = self._master
            if master < 0:
                return
            data, end = _read_batch(master)
            if data:
                await out.write(data)
                pause = _HUP_PAUSE_MIN
            if end is None:
                continue  # the batch is full: there may be more right away
            if exited:
                return  # drained after the exit: nothing is left behind
            if end is _AGAIN:
                await self._wait_readable(master)
            else:
                # No slave open (EIO): not the end. A hung-up master is always
                # "readable", so pause instead of polling; the exit ends the pause.
                with trio.move_on_after(pause):
                    await self._exited.wait()
                pause = min(pause * 2, _HUP_PAUSE_MAX)

    async def _wait_readable(self, master: int) -> None:
        """Wait for the master, or for the exit (then one more drain round runs)."""
        if self._exited.is_set():
            return
        with trio.CancelScope() as scope:
            self._wake = scope
            try:
                await trio.lowlevel.wait_readable(master)
            finally:
                self._wake = None

    async def _stdin_loop(self, scope: trio.CancelScope, src: int) -> None:
        try:
            with scope:
                last = await self._copy_stdin(src)
                self._end_of_input(last)
        except trio.ClosedResourceError:
            pass
        except Exception:
            log.exception("terminal input copy failed")
        finally:
            close_fd(src)

    async def _copy_stdin(self, src: int) -> bytes:
        """stdin FIFO → master until EOF (CloseIO + the client closed); returns the last byte."""
        last = b""
        while True:
            try:
                data = os.read(src, _CHUNK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src)
                continue
            if not data:
                return last
            last = data[-1:]
            view = memoryview(data)
            while view:
                master = self._master
                if master < 0:
                    return b""
                try:
                    view = view[os.write(master, view) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(master)
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    log.debug("terminal input dropped: no slave open")
                    break

    def _end_of_input(self, last: bytes) -> None:
        """stdin ended: let a line-mode reader in the container see EOF.

        A pty master cannot be half-closed (the Go shim closes the whole
        console, output included). Typing VEOF, as a user would, ends the input
        of a canonical-mode reader; a second one first completes a pending line.
        """
        master = self._master
        if master < 0 or self._exited.is_set():
            return
        try:
            attrs = termios.tcgetattr(master)  # a master reports its slave's settings
        except termios.error:
            return
        eof = attrs[6][termios.VEOF]
        if not attrs[3] & termios.ICANON or eof in (b"\0", 0):
            return
        count = 1 if last in (b"", b"\n", b"\r") else 2
        with contextlib.suppress(OSError):
            os.write(master, eof * count)


_AGAIN = "again"
_HUNG_UP = "hung up"


def _read_batch(master: int) -> tuple[bytearray, str | None]:
    """Read what the master has now, up to _BATCH; with why it stopped (None: batch full)."""
    data = bytearray()
    while len(data) < _BATCH:
        try:
            chunk = os.read(master, _CHUNK)
        except BlockingIOError:
            return data, _AGAIN
        except OSError as exc:
            if exc.errno == errno.EIO:
                return data, _HUNG_UP
            raise
        if not chunk:
            return data, _HUNG_UP
        data += chunk
    return data, None
