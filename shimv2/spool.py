"""Output that never blocks the container: a bounded spool in front of the client's FIFO.

The client (containerd, CRI, ``ctr``) reads stdout/stderr from FIFOs we hold
open O_RDWR, so a reader that goes away (containerd restarting, a detached
``ctr``) causes no EPIPE, only a FIFO that fills up. The Go shim then stops
copying and the container blocks in write(2) until a reader returns
(containerd#9342, #11511, #11805). We do not: when the FIFO has taken nothing
for :data:`STALL_GRACE`, the copy loop keeps draining the container's side
into a :class:`Spool`, a ring in a file in the bundle, and a deliverer task
moves the spool into the FIFO as soon as it takes data again, oldest byte
first. Only when the spool is empty do bytes go straight to the FIFO again, so
the order is exactly the container's. Past the spool's limit the oldest bytes
are overwritten; the loss is counted and logged. Filling the spool uses
splice(2); delivering it copies (see :meth:`Spool.deliver_to`), but that is
only the catching-up path: while the spool is empty, container pipe → FIFO
stays a zero-copy splice.

:class:`Sink` is the one place for this logic: the pipe pumps
(:func:`shimv2.stdio.pump`) feed it with :meth:`Sink.splice_from`, the pty
loop (:mod:`shimv2.console`) with :meth:`Sink.write`.

At the end of the output the sink keeps the FIFO open until its reader has
emptied it: the kernel discards what a FIFO holds once nobody has it open, and
a client may be between two attaches right then. Meanwhile it records the
reader's :class:`Progress`, which tells the exit how long to wait: an attached
``ctr`` closes its FIFOs as soon as it has the exit status.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import select
import stat
import struct
import termios
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import trio

from shimv2.options import DEFAULT_SPOOL_LIMIT

log = logging.getLogger(__name__)

#: How long the client's FIFO may take nothing before we spool. Long enough that
#: a busy but live reader gives back-pressure instead of disk traffic; short
#: enough that the container barely notices a reader that went away.
STALL_GRACE = 0.1
#: At most one "dropped" warning per stream in this many seconds.
REPORT_INTERVAL = 10.0

#: At the end of output we poll the FIFO until its reader has emptied it: this
#: often while the reader takes data, backing off to the maximum while it does not.
DRAIN_POLL_MIN = 0.001
DRAIN_POLL_MAX = 0.25

_CHUNK = 1 << 16
_SPLICE_CHUNK = 1 << 20
_F_GETPIPE_SZ = 1032
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def human(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def unread(fd: int) -> int:
    """Bytes in the pipe or FIFO behind ``fd`` that its reader has not taken yet."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])
    except OSError:
        return 0  # nothing we could wait for


def hung_up(fd: int) -> bool:
    """Whether the pipe ``fd`` reads from has no writer left: what it holds is all there is."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLHUP is reported whatever we ask for
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def has_reader(fd: int) -> bool:
    """Whether anyone has the FIFO open for reading; ``fd`` must be write-only
    (POLLERR: no reader), an O_RDWR fd is a reader itself."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return not any(events & select.POLLERR for _, events in poller.poll(0))


def ended_empty(fd: int) -> bool:
    """Whether the pipe ``fd`` reads from is at its end already: no writer left, nothing in it."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events == select.POLLHUP for _, events in poller.poll(0))


def readable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@dataclass(frozen=True)
class SpoolConfig:
    """Where a process's output streams spool, and how much (``limit`` 0: never, block)."""

    directory: str  # the bundle
    limit: int = DEFAULT_SPOOL_LIMIT  # bytes per stream
    prefix: str = ""  # "" for the init, "<exec id>." for an exec: one file per stream
    owner: str = ""  # for log lines

    def spool(self, stream: str) -> Spool | None:
        if self.limit <= 0:
            return None
        path = os.path.join(self.directory, f"{self.prefix}{stream}.spool")
        label = f"{stream} of {self.owner}" if self.owner else stream
        return Spool(path, self.limit, label)


class SpoolTotals:
    """Every spool of this process, for the metrics and the debug view."""

    def __init__(self) -> None:
        self.delivered = 0  # bytes that went from a spool to their reader
        self.dropped = 0  # bytes overwritten at a spool's limit
        self.live: weakref.WeakSet[Spool] = weakref.WeakSet()

    def spools(self) -> list[Spool]:
        # Also read from the metrics exporter's thread: retry if a spool came or went.
        for _ in range(5):
            try:
                return list(self.live)
            except RuntimeError:
                continue
        return []

    @property
    def held(self) -> int:
        return sum(len(spool) for spool in self.spools())


TOTALS = SpoolTotals()


class Spool:
    """A bounded queue of bytes in a file, used as a ring of ``limit`` bytes.

    ``head``/``tail`` are stream offsets (they only grow); byte ``i`` lives at
    file offset ``i % limit``. Storing past the limit overwrites the oldest
    bytes, which are then counted as dropped. The file is created on first use,
    truncated whenever the spool runs empty (it is usually on tmpfs: that frees
    the memory) and removed by :meth:`close`.
    """

    def __init__(self, path: str, limit: int, label: str) -> None:
        if limit <= 0:
            raise ValueError("a spool needs a positive limit")
        self.path = path
        self.limit = limit
        self.label = label
        self.fd = -1
        self.head = 0
        self.tail = 0
        self.dropped = 0  # in total, for tests and the final report
        self.failed = False  # the file could not take data: no spooling until it is empty
        self._unreported = 0
        self._next_report = -math.inf
        self._announced = False
        self._chunk = 0  # bytes per delivery; the destination's pipe size
        TOTALS.live.add(self)

    def __len__(self) -> int:
        return self.tail - self.head

    @property
    def usable(self) -> bool:
        """False while a failed file still holds bytes (they go first); empty, we retry."""
        return not (self.failed and len(self))

    def _file(self) -> int:
        if self.fd < 0:
            flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
            self.fd = os.open(self.path, flags, 0o600)
        if not self._announced:
            self._announced = True
            log.info(
                "%s: nobody reads, spooling to %s (limit %s)",
                self.label,
                self.path,
                human(self.limit),
            )
        return self.fd

    def fill_from(self, src: int) -> int:
        """splice what ``src`` holds into the spool; 0 at EOF, BlockingIOError when empty."""
        fd = self._file()
        pos = self.tail % self.limit
        n = os.splice(
            src, fd, min(_SPLICE_CHUNK, self.limit - pos), offset_dst=pos, flags=_SPLICE_FLAGS
        )
        self._stored(n)
        return n

    def write(self, data: memoryview) -> int:
        """Store ``data``; returns how much of it was consumed (less only if the file failed)."""
        consumed = 0
        try:
            fd = self._file()
            if len(data) > self.limit:
                # Only its newest ``limit`` bytes can stay; the rest is dropped at once.
                skip = len(data) - self.limit
                self._drop(skip + len(self))
                self.head = self.tail = self.tail + skip
                data, consumed = data[skip:], skip
            while data:
                pos = self.tail % self.limit
                n = os.pwrite(fd, data[: self.limit - pos], pos)
                self._stored(n)
                data, consumed = data[n:], consumed + n
        except OSError as exc:
            self.fail(exc)
        return consumed

    def deliver_to(self, dst: int) -> int:
        """Write the oldest bytes to ``dst``; BlockingIOError while it is full.

        A copy, not splice(2): a spliced page stays shared between the file and
        the FIFO, so when the ring later wraps onto it the reader would get the
        new bytes in place of the ones it has not read yet.
        """
        if self._chunk == 0:
            try:  # as much as the FIFO takes at once: no reads wasted on partial writes
                self._chunk = max(fcntl.fcntl(dst, _F_GETPIPE_SZ), 4096)
            except OSError:
                self._chunk = _CHUNK
        pos = self.head % self.limit
        data = os.pread(self.fd, min(self._chunk, len(self), self.limit - pos), pos)
        if not data:
            raise OSError(errno.EIO, f"spool file {self.path} ended early")
        n = os.write(dst, data)
        self.head += n
        TOTALS.delivered += n
        if not len(self):
            self._reset()
        return n

    def discard(self) -> int:
        """Forget what is stored (the destination is gone); returns how much that was."""
        n = len(self)
        self._reset()
        return n

    def fail(self, exc: OSError) -> None:
        """The file cannot take more (disk full, bundle gone): stop spooling until empty."""
        if not self.failed:
            log.error(
                "%s: cannot spool to %s (%s); output waits for a reader", self.label, self.path, exc
            )
        self.failed = True

    def close(self) -> None:
        """Remove the file; report what was lost. Idempotent."""
        left = len(self)
        self.head = self.tail
        if left:
            log.warning(
                "%s: %d spooled bytes were never read; discarded when the I/O closed",
                self.label,
                left,
            )
        self._report(force=True)
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _stored(self, n: int) -> None:
        self.tail += n
        over = len(self) - self.limit
        if over > 0:
            # The ring wrapped onto bytes nobody read yet: they are the oldest, gone.
            self.head += over
            self._drop(over)

    def _drop(self, n: int) -> None:
        if n > 0:
            self.dropped += n
            TOTALS.dropped += n
            self._unreported += n
            self._report()

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._unreported or (now < self._next_report and not force):
            return
        log.warning(
            "%s: no reader, dropped %d bytes of oldest output (spool limit %s; %d dropped in all)",
            self.label,
            self._unreported,
            human(self.limit),
            self.dropped,
        )
        self._unreported = 0
        self._next_report = now + REPORT_INTERVAL

    def _reset(self) -> None:
        self.head = self.tail = 0
        self.failed = False  # emptied: worth trying again at the next stall
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            except OSError as exc:
                log.debug("%s: truncating %s: %s", self.label, self.path, exc)


class Progress:
    """When a process's output last moved towards its reader (trio's clock).

    Moving means a write to the destination succeeded or its reader took bytes
    out of the FIFO. An exit waits for the output as long as it moves and has
    an end, and not for a FIFO nobody has open
    (:meth:`shimv2.stdio.StdioBase.wait_output`).
    """

    def __init__(self) -> None:
        self.last = -math.inf
        self.sources: set[int] = set()  # the pipes being copied (their pumps register them)
        self.running = 0  # sinks
        self.unattended = 0  # of those: the rest waits in a FIFO that no reader has open
        self.changed = trio.Event()  # set (and replaced) when ``unattended`` changes

    def note(self) -> None:
        self.last = trio.current_time()

    @property
    def nobody_reads(self) -> bool:
        """All that is left waits for readers that are not there (``ctr run -d``)."""
        return self.running > 0 and self.unattended == self.running

    def attend(self, delta: int) -> None:
        self.unattended += delta
        self.changed.set()
        self.changed = trio.Event()

    @property
    def finite(self) -> bool:
        """No source has a writer left. After the exit one may still have: an
        orphan of the process holds it open, and its output need not end."""
        return all(hung_up(fd) for fd in self.sources)


class Sink:
    """One output stream's destination: the client's fd, with an optional spool in front.

    Feed it with :meth:`splice_from` (a pipe) or :meth:`write` (bytes) inside
    :meth:`run`, which also runs the deliverer: spooled bytes go to ``fd``
    whenever it takes them, and the run ends only when they all went (or the
    run is cancelled, e.g. by Delete). Invariants that keep the order and let
    two tasks share ``fd`` (trio allows one waiter per fd and direction):
    new bytes go to ``fd`` directly only while the spool is empty, and only the
    deliverer waits for ``fd`` while it is not.

    After a write error (not "full") the sink swallows the rest: a container
    must never block on a stream nobody can take. ``fd < 0`` discards everything.

    A FIFO is kept open at the end until its reader has emptied it: closing
    the last fd of a FIFO that nobody reads at that moment (a client between
    two attaches) makes the kernel discard what it holds.
    """

    def __init__(
        self,
        fd: int,
        spool: Spool | None = None,
        what: str = "output",
        progress: Progress | None = None,
        *,
        drain: bool = True,
    ) -> None:
        self.fd = fd
        self.spool = spool
        self.what = what
        self.progress = progress if progress is not None else Progress()
        self.broken = fd < 0
        # Whether to wait for the reader at the end (not worth it for a process's stdin).
        self._drain_fifo = drain and fd >= 0 and stat.S_ISFIFO(os.fstat(fd).st_mode)
        self._wake = trio.Event()  # for the deliverer: the spool has data
        self._emptied = trio.Event()  # for a writer waiting on a failed spool
        # The deliverer starts with the first spooled byte: most streams never
        # spool, and an idle task would cost its start and its cancellation at EOF.
        self._nursery: trio.Nursery | None = None
        self._delivering = False

    async def run(self, feed: Callable[[Sink], Awaitable[None]]) -> None:
        """Run ``feed(self)`` with the deliverer beside it, then deliver what is left,
        and return once a FIFO's reader has taken it all (or when cancelled)."""
        spool = self.spool
        self.progress.running += 1
        try:
            if spool is None:
                await feed(self)
            else:
                await self._feed_and_deliver(feed, spool)
            await self._drain()
        finally:
            self.progress.running -= 1

    async def _feed_and_deliver(
        self, feed: Callable[[Sink], Awaitable[None]], spool: Spool
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if len(spool):
                    self._kick()
                await feed(self)
                self._nursery = None
                nursery.cancel_scope.cancel()
            await self._deliver(True)
        finally:
            self._nursery = None
            spool.close()

    # -- feeding ------------------------------------------------------------------

    async def splice_from(self, src: int) -> None:
        """Move everything from the pipe ``src`` until its EOF, in the kernel where possible."""
        spool = self.spool
        moved = False
        while True:
            if self.broken:
                await _discard(src)
                return
            if spool is not None and len(spool):
                if not spool.usable:
                    await self._wait_emptied()
                    continue
                # Behind the spool: new bytes queue up after it, in order.
                try:
                    n = spool.fill_from(src)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(src)
                    continue
                except OSError as exc:
                    spool.fail(exc)
                    continue
                if n == 0:
                    return
                self._kick()
                continue
            try:
                n = os.splice(src, self.fd, _SPLICE_CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # Either src is empty or fd is full: find out which to wait for.
                if readable_now(src):
                    await self._stalled(src)
                else:
                    await trio.lowlevel.wait_readable(src)
                continue
            except OSError as exc:
                if exc.errno == errno.EINVAL and not moved:
                    await self._copy_from(src)  # e.g. an O_APPEND file: no splice
                    return
                self._break(exc)
                continue
            if n == 0:
                return
            moved = True
            self.progress.note()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Take ``data``: written to ``fd``, or spooled if ``fd`` has been full for a while."""
        view = memoryview(data)
        spool = self.spool
        while view and not self.broken:
            if spool is not None and len(spool):
                if not spool.usable:
                    await self._wait_emptied()
                    continue
                view = view[self._spool_write(spool, view) :]
                continue
            try:
                view = view[os.write(self.fd, view) :]
                self.progress.note()
            except BlockingIOError:
                if spool is None or not spool.usable:
                    await trio.lowlevel.wait_writable(self.fd)
                    continue
                with trio.move_on_after(STALL_GRACE):
                    await trio.lowlevel.wait_writable(self.fd)
                    continue
                view = view[self._spool_write(spool, view) :]
            except OSError as exc:
                self._break(exc)

    async def _copy_from(self, src: int) -> None:
        async for data in _chunks(src, _CHUNK):
            await self.write(data)

    async def _stalled(self, src: int) -> None:
        """``fd`` is full while ``src`` has data: wait for the reader a little, then spool."""
        spool = self.spool
        if spool is None or not spool.usable:
            await trio.lowlevel.wait_writable(self.fd)  # no spool: block, as the Go shim does
            return
        with trio.move_on_after(STALL_GRACE):
            await trio.lowlevel.wait_writable(self.fd)
            return
        # Nobody took anything for a while: drain the container into the spool.
        try:
            if spool.fill_from(src):
                self._kick()
        except BlockingIOError:
            pass
        except OSError as exc:
            spool.fail(exc)

    def _spool_write(self, spool: Spool, view: memoryview) -> int:
        n = spool.write(view)
        if len(spool):
            self._kick()
        return n

    def _kick(self) -> None:
        """The spool has data: wake the deliverer (start it the first time)."""
        self._wake.set()
        if not self._delivering and self._nursery is not None:
            self._delivering = True
            self._nursery.start_soon(self._deliver, False)

    async def _wait_emptied(self) -> None:
        spool = self.spool
        while spool is not None and len(spool) and not self.broken:
            self._emptied = trio.Event()
            await self._emptied.wait()

    def _break(self, exc: OSError) -> None:
        log.warning("%s: writing failed (%s); discarding the rest", self.what, exc)
        self.broken = True
        if self.spool is not None:
            self.spool.discard()
        self._wake.set()
        self._emptied.set()

    # -- delivering ---------------------------------------------------------------

    async def _deliver(self, until_empty: bool) -> None:
        """Spool → ``fd`` whenever it takes data; with ``until_empty``, stop when drained."""
        spool = self.spool
        assert spool is not None
        while True:
            if self.broken or not len(spool):
                self._emptied.set()
                if until_empty:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            try:
                spool.deliver_to(self.fd)
                self.progress.note()
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)
            except OSError as exc:
                self._break(exc)

    async def _drain(self) -> None:
        """Wait until the FIFO's reader has taken everything in it: polled, as a pipe
        signals nothing when it runs empty. Each byte taken counts as progress."""
        if self.broken or not self._drain_fifo or not unread(self.fd):
            return
        self._write_only()
        unattended = False
        left = unread(self.fd)
        try:
            pause = DRAIN_POLL_MIN
            while left:
                if unattended == has_reader(self.fd):
                    unattended = not unattended
                    self.progress.attend(1 if unattended else -1)
                await trio.sleep(pause)
                now = unread(self.fd)
                if now < left:
                    self.progress.note()
                    pause = DRAIN_POLL_MIN
                else:
                    pause = min(pause * 2, DRAIN_POLL_MAX)
                left = now
        finally:
            if unattended:
                self.progress.attend(-1)
            if left and not has_reader(self.fd):  # Delete: closing the FIFO discards them
                log.warning(
                    "%s: %d bytes in the FIFO were never read; discarded when the I/O closed",
                    self.what,
                    left,
                )

    def _write_only(self) -> None:
        """Hold the FIFO by a write-only fd from now on (same fd number): poll() then
        tells whether any reader has it open, and the bytes in it stay as long as we
        do. Best effort: with our O_RDWR fd we count as a reader ourselves."""
        try:
            flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
            fd = os.open(f"/proc/self/fd/{self.fd}", flags)  # we are a reader: no ENXIO
        except OSError as exc:
            log.debug("%s: cannot reopen the FIFO write-only: %s", self.what, exc)
            return
        trio.lowlevel.notify_closing(self.fd)  # nobody waits on it any more
        os.dup2(fd, self.fd, inheritable=False)
        os.close(fd)


async def _discard(src: int) -> None:
    """Read ``src`` to EOF into nothing, so its writer never blocks."""
    async for _ in _chunks(src, _SPLICE_CHUNK):
        pass


async def _chunks(src: int, size: int) -> AsyncIterator[bytes]:
    """Non-blocking reads of ``src`` until EOF (or EIO: a pty whose slave is gone)."""
    while True:
        try:
            data = os.read(src, size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src)
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:
                return
            raise
        if not data:
            return
        yield data
