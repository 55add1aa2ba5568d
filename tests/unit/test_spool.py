"""Output spooling while nobody reads a FIFO (shimv2.spool), with real pipes, FIFOs, ptys.

The test plays the container with *blocking* writes from a thread (as a real
process would write): if the shim stopped draining, the thread would hang and
the test would fail on its deadline. It plays containerd's client by opening
the FIFO for reading only later, as a restarted containerd (or a new
``ctr task attach``) does.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import struct
import termios
import threading
import tty
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from shimv2 import spool as spoolmod
from shimv2.console import ConsoleIO
from shimv2.spool import Sink, Spool, SpoolConfig
from shimv2.stdio import PipeIO, StdioSpec

TIMEOUT = 20
MIB = 1 << 20
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032


def mkfifo(tmp_path: Path, name: str = "stdout") -> str:
    path = tmp_path / name
    os.mkfifo(path, 0o700)
    return str(path)


def pattern(size: int) -> bytes:
    """Numbered lines: any reordering, duplication or gap shows."""
    lines = b"".join(b"%09d\n" % i for i in range(size // 10 + 1))
    return lines[:size]


def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "bundle"
    path.mkdir(exist_ok=True)
    return path


def container_end(io: PipeIO, target: int = 1) -> int:
    fd = io.runc_fds()[target]
    assert fd is not None
    end = os.dup(fd)
    io.close_after_start()
    os.set_blocking(end, True)  # a container's write(2) blocks when its pipe is full
    return end


async def container_writes(
    fd: int, data: bytes, chunk: int = 1 << 16, *, close: bool = True
) -> None:
    """Blocking writes from a thread, then close (the process exits); fails if they block."""

    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:chunk]) :]
        if close:
            os.close(fd)

    with trio.fail_after(TIMEOUT):
        # abandoned on timeout: a blocked writer fails the test instead of hanging it
        await trio.to_thread.run_sync(write, abandon_on_cancel=True)


async def read_to_eof(path: str, into: bytearray | None = None, pause: float = 0.0) -> bytes:
    """Open the FIFO now (the reader returns) and read it until the shim closes it."""
    got = bytearray() if into is None else into
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with trio.fail_after(TIMEOUT):
            while True:
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                if not data:
                    return bytes(got)
                got += data
                if pause:
                    await trio.sleep(pause)
    finally:
        os.close(fd)


def fifo_size(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        return fcntl.fcntl(fd, _F_GETPIPE_SZ)
    finally:
        os.close(fd)


def unread(fd: int) -> int:
    """FIONREAD: the bytes in a pipe or FIFO (through either end) that nobody read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def spooled(spool_file: Path) -> int:
    """Bytes waiting in the spool (while nothing was delivered from it since it was empty)."""
    try:
        return spool_file.stat().st_size
    except FileNotFoundError:
        return 0


def read_now(fd: int, into: bytearray) -> None:
    """Read all the FIFO holds now without a checkpoint: the shim cannot run meanwhile."""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            return
        into += chunk


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the shim run until ``condition`` holds (a state, not a duration)."""
    with trio.move_on_after(TIMEOUT):
        while not condition():
            await trio.sleep(0.005)
    assert condition(), f"never came: {what}"


def dropped_in_logs(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        int(m.group(1))
        for r in caplog.records
        if (m := re.search(r"no reader, dropped (\d+) bytes of oldest output", r.getMessage()))
    )


# --------------------------------------------------------------------------- Spool


def drain_spool(spool: Spool) -> bytes:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    got = bytearray()
    try:
        while len(spool):
            spool.deliver_to(w)
            got += os.read(r, 1 << 20)
    finally:
        os.close(r)
        os.close(w)
    return bytes(got)


def test_spool_is_a_bounded_ring(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.spool"
    spool = Spool(str(path), 10, "stdout of c")
    assert not path.exists()  # created on first use only
    assert spool.write(memoryview(b"012345")) == 6
    assert path.stat().st_size == 6
    assert drain_spool(spool) == b"012345"
    assert len(spool) == 0
    assert path.stat().st_size == 0  # truncated when empty: tmpfs gives the memory back
    spool.write(memoryview(b"abcdefgh"))
    assert drain_spool(spool) == b"abcdefgh"
    # wraps around the end of the file, keeps the newest 10 bytes, counts the rest
    spool.write(memoryview(b"0123456"))
    spool.write(memoryview(b"789ABCDEF"))
    assert spool.dropped == 6
    assert path.stat().st_size <= 10
    assert drain_spool(spool) == b"6789ABCDEF"
    assert "dropped 6 bytes of oldest output (spool limit 10 bytes" in caplog.text
    spool.close()
    assert not path.exists()
    spool.close()  # idempotent


def test_spool_write_larger_than_the_limit(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "s.spool"), 8, "x")
    spool.write(memoryview(b"abc"))
    assert spool.write(memoryview(b"0123456789XY")) == 12
    assert spool.dropped == 3 + 4
    assert drain_spool(spool) == b"456789XY"
    spool.close()


def test_spool_fill_from_a_pipe_in_order(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "s.spool"), 1000, "x")
    data = pattern(2500)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    got = b""
    for i in range(0, len(data), 300):
        os.write(w, data[i : i + 300])
        while True:
            try:
                spool.fill_from(r)
            except BlockingIOError:
                break
        if i % 600 == 0:
            got += drain_spool(spool)
    os.close(w)
    assert spool.fill_from(r) == 0  # EOF
    got += drain_spool(spool)
    os.close(r)
    assert got == data  # never more than 1000 pending: nothing dropped
    assert spool.dropped == 0
    spool.close()


def test_spool_config_names_files_per_process_and_stream(tmp_path: Path) -> None:
    init = SpoolConfig(str(tmp_path), 100, owner="c1")
    exec_ = SpoolConfig(str(tmp_path), 100, prefix="e1.", owner="exec e1 of c1")
    assert init.spool("stdout").path == str(tmp_path / "stdout.spool")  # type: ignore[union-attr]
    s = exec_.spool("stderr")
    assert s is not None
    assert s.path == str(tmp_path / "e1.stderr.spool")
    assert s.label == "stderr of exec e1 of c1"
    assert SpoolConfig(str(tmp_path), 0).spool("stdout") is None


# --------------------------------------------------------------------------- PipeIO


async def test_no_reader_the_container_never_blocks_and_every_byte_arrives(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "shimv2.spool")
    path = mkfifo(tmp_path)
    io = PipeIO(StdioSpec(stdout=path), spool=SpoolConfig(str(bundle(tmp_path)), owner="c1"))
    end = container_end(io)
    io.start(nursery)
    data = pattern(8 * MIB)  # far more than the pipe (1 MiB) and the FIFO hold
    await container_writes(end, data)  # nobody reads, yet the container finishes
    spool_file = bundle(tmp_path) / "stdout.spool"
    assert spool_file.exists()
    assert "stdout of c1: nobody reads, spooling to" in caplog.text
    assert not io.output_done.is_set()  # the bytes are ours until a reader takes them
    got = await read_to_eof(path)  # containerd is back
    assert len(got) == len(data)
    assert got == data
    with trio.fail_after(TIMEOUT):
        await io.output_done.wait()
    assert not spool_file.exists()
    assert dropped_in_logs(caplog) == 0
    io.close()


async def test_past_the_limit_the_oldest_bytes_are_dropped_and_counted(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 256 << 10
    path = mkfifo(tmp_path)
    io = PipeIO(StdioSpec(stdout=path), spool=SpoolConfig(str(bundle(tmp_path)), limit, owner="c2"))
    end = container_end(io)
    io.start(nursery)
    data = pattern(4 * MIB)
    await container_writes(end, data)
    spool_file = bundle(tmp_path) / "stdout.spool"
    assert spool_file.stat().st_size <= limit  # bounded on disk
    got = await read_to_eof(path)
    # What went into the FIFO before it filled up, then the newest `limit` bytes.
    head = len(got) - limit
    assert 0 < head <= fifo_size(path) + MIB
    assert got[:head] == data[:head]
    assert got[head:] == data[-limit:]
    with trio.fail_after(TIMEOUT):
        await io.output_done.wait()
    assert dropped_in_logs(caplog) == len(data) - len(got)
    assert "stdout of c2: no reader, dropped" in caplog.text
    assert "(spool limit 256 KiB" in caplog.text
    assert not spool_file.exists()
    io.close()


async def test_a_reader_that_comes_and_goes_gets_everything_in_order(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Spool → direct → spool, and the end of the output while no reader is there.

    The reader opens, reads and closes the FIFO with no checkpoint in between, so
    the shim runs only at the points chosen here, however loaded the machine is.
    At the end the shim moves the last spooled bytes into the FIFO while nobody
    has it open: closing the FIFO then would make the kernel discard them.
    """
    path = mkfifo(tmp_path)
    io = PipeIO(StdioSpec(stdout=path), spool=SpoolConfig(str(bundle(tmp_path))))
    capacity = fifo_size(path)
    end = container_end(io)
    io.start(nursery)
    spool_file = bundle(tmp_path) / "stdout.spool"
    first, second = 3 * capacity, 3 * capacity + capacity // 4
    data = pattern(second + capacity + capacity // 2)
    got = bytearray()

    # Nobody reads: the FIFO fills up, the rest goes to the spool.
    await container_writes(end, data[:first], close=False)
    await until(lambda: unread(end) == 0, "the container's pipe drained")
    assert spooled(spool_file) > 0
    # A reader comes, takes all of that (the spool first, in order), goes away.
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with trio.fail_after(TIMEOUT):
        read_now(reader, got)
        while len(got) < first:
            await trio.lowlevel.wait_readable(reader)
            read_now(reader, got)
    os.close(reader)
    assert got == data[:first]
    assert spooled(spool_file) == 0
    # The spool is empty: new output goes straight into the FIFO again.
    await container_writes(end, data[first:second], close=False)
    await until(lambda: unread(end) == 0, "the container's pipe drained")
    assert spooled(spool_file) == 0
    # The last output overflows the FIFO into the spool; the process exits.
    await container_writes(end, data[second:])
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    left = len(data) - len(got)
    await until(lambda: spooled(spool_file) + unread(reader) == left, "all of it spooled")
    rest = spooled(spool_file)
    assert 0 < rest <= capacity  # fits into the FIFO once the reader emptied it
    read_now(reader, got)  # the reader takes what the FIFO holds and goes, in one step
    os.close(reader)
    # Now the shim moves the rest into the FIFO, with no reader there.
    await until(lambda: not spool_file.exists(), "the spool emptied into the FIFO")
    await read_to_eof(path, got)  # the reader comes back for it
    assert len(got) == len(data)
    assert got == data
    with trio.fail_after(TIMEOUT):
        await io.output_done.wait()
    assert not list(bundle(tmp_path).iterdir())
    io.close()


async def test_close_removes_the_spool_and_reports_the_unread_bytes(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    path = mkfifo(tmp_path)
    io = PipeIO(StdioSpec(stdout=path), spool=SpoolConfig(str(bundle(tmp_path)), owner="c3"))
    end = container_end(io)
    io.start(nursery)
    # more than the pipe and the FIFO hold (1 MiB each)
    await container_writes(end, pattern(4 * MIB))
    spool_file = bundle(tmp_path) / "stdout.spool"
    assert spool_file.exists()
    io.close()  # Delete without a reader ever coming back
    with trio.fail_after(TIMEOUT):
        await io.output_done.wait()
    assert not spool_file.exists()
    assert re.search(r"stdout of c3: \d+ spooled bytes were never read", caplog.text)


async def test_limit_zero_blocks_like_the_go_shim(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = mkfifo(tmp_path)
    io = PipeIO(StdioSpec(stdout=path), spool=SpoolConfig(str(bundle(tmp_path)), 0))
    end = container_end(io)
    io.start(nursery)
    data = pattern(4 * MIB)
    done = threading.Event()

    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(end, view[: 1 << 16]) :]
        os.close(end)
        done.set()

    nursery.start_soon(trio.to_thread.run_sync, write)
    await trio.sleep(0.5)
    assert not done.is_set(), "with limit 0 the container should wait for a reader"
    assert not list(bundle(tmp_path).iterdir())
    assert await read_to_eof(path) == data
    assert done.is_set()
    io.close()


async def test_a_spool_that_cannot_be_written_falls_back_to_waiting(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    path = mkfifo(tmp_path)
    missing = tmp_path / "no-such-bundle"
    io = PipeIO(StdioSpec(stdout=path), spool=SpoolConfig(str(missing), owner="c4"))
    end = container_end(io)
    io.start(nursery)
    data = pattern(3 * MIB)
    nursery.start_soon(container_writes, end, data)
    await trio.sleep(0.5)
    assert "stdout of c4: cannot spool to" in caplog.text
    assert await read_to_eof(path) == data  # nothing lost
    io.close()


async def test_fast_reader_never_spools(tmp_path: Path, nursery: trio.Nursery) -> None:
    """The zero-copy path stays the path while a reader keeps up."""
    path = mkfifo(tmp_path)
    io = PipeIO(StdioSpec(stdout=path), spool=SpoolConfig(str(bundle(tmp_path))))
    end = container_end(io)
    io.start(nursery)
    data = pattern(16 * MIB)
    got = bytearray()
    async with trio.open_nursery() as inner:
        inner.start_soon(read_to_eof, path, got)
        await trio.sleep(0.05)
        await container_writes(end, data)
    assert got == data
    assert not list(bundle(tmp_path).iterdir())
    io.close()


# --------------------------------------------------------------------------- Sink.write, pty


async def test_sink_write_spools_and_delivers_in_order(tmp_path: Path) -> None:
    path = mkfifo(tmp_path)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)  # as open_output does
    spool = SpoolConfig(str(bundle(tmp_path)), owner="t").spool("stdout")
    sink = Sink(fd, spool)
    data = pattern(3 * MIB)
    written = trio.Event()

    async def feed(sink: Sink) -> None:
        for i in range(0, len(data), 70001):
            await sink.write(data[i : i + 70001])
        written.set()

    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.run, feed)
        with trio.fail_after(TIMEOUT):
            await written.wait()  # no reader, yet every write returned
        assert (bundle(tmp_path) / "stdout.spool").exists()
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with trio.fail_after(TIMEOUT):
            while len(got) < len(data):
                try:
                    got += os.read(reader, 1 << 16)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(reader)
        os.close(reader)
    assert got == data
    assert not (bundle(tmp_path) / "stdout.spool").exists()
    os.close(fd)


async def test_tty_output_is_spooled_while_nobody_reads(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = mkfifo(tmp_path)
    io = ConsoleIO(
        StdioSpec(stdout=path, terminal=True), spool=SpoolConfig(str(bundle(tmp_path)), owner="c5")
    )

    def runc() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(io.console_socket)
            socket.send_fds(s, [b"/dev/pts/x"], [master])

    async with trio.open_nursery() as inner:
        inner.start_soon(trio.to_thread.run_sync, runc)
        await io.receive_master(timeout=TIMEOUT)
    os.close(master)
    io.start(nursery)
    data = pattern(4 * MIB)
    await container_writes(slave, data)  # closes the slave: the process is gone
    io.process_exited()
    assert (bundle(tmp_path) / "stdout.spool").exists()
    got = await read_to_eof(path)
    assert len(got) == len(data)
    assert got == data
    assert await io.wait_output(TIMEOUT)
    assert not (bundle(tmp_path) / "stdout.spool").exists()
    io.close()


def test_stall_grace_is_short() -> None:
    # The container may wait this long for a reader before we spool; keep it well
    # below anything a user would call "blocked".
    assert 0 < spoolmod.STALL_GRACE <= 0.5


def test_delivered_bytes_do_not_change_when_the_ring_wraps(tmp_path: Path) -> None:
    """Bytes handed to the FIFO but not read yet must not alias the ring's pages
    (a page spliced from a file into a pipe is shared: overwriting it in the ring
    would change what the reader gets)."""
    page = os.sysconf("SC_PAGE_SIZE")
    spool = Spool(str(tmp_path / "s.spool"), 2 * page, "x")
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.fcntl(w, _F_SETPIPE_SZ, page)  # the FIFO takes one page, then is full
    spool.write(memoryview(b"A" * (2 * page)))
    delivered = 0
    with pytest.raises(BlockingIOError):
        while True:
            delivered += spool.deliver_to(w)
    assert delivered == page
    spool.write(memoryview(b"B" * page))  # wraps onto the first page
    assert os.read(r, 2 * page) == b"A" * page
    assert drain_spool(spool) == b"A" * page + b"B" * page
    os.close(r)
    os.close(w)
    spool.close()
