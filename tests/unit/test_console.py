"""ConsoleIO and the console socket, with real ptys, sockets and FIFOs.

A fake runc connects to the console socket (from a thread) and sends a pty
master with SCM_RIGHTS; the test plays the container on the slave side and
containerd's client on the FIFO side.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from shimv2.console import ConsoleIO, ConsoleSocket
from shimv2.reaper import Reaper
from shimv2.stdio import LoggerContext, StdioSpec
from shimv2.ttrpc import Code, TTRPCError

TIMEOUT = 20


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def send_console(path: str, fds: list[int] | None, data: bytes = b"/dev/pts/test") -> None:
    """What runc does: connect, send the master's name with the fd(s) attached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        if fds is None:
            return  # connect and hang up without a message
        if fds:
            socket.send_fds(s, [data], fds)
        else:
            s.sendall(data)


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    fds = [master, slave]
    yield master, slave
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def fifo(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    os.mkfifo(path, 0o600)
    return str(path)


async def attach(io: ConsoleIO, master: int, *, delay: float = 0.0) -> None:
    """A fake runc (in a thread, after ``delay``) hands ``master`` over; we receive it."""
    socket_dir = os.path.dirname(io.console_socket)
    assert os.stat(socket_dir).st_mode & 0o777 == 0o700

    def runc() -> None:
        time.sleep(delay)
        send_console(io.console_socket, [master])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, runc)
        await io.receive_master(timeout=TIMEOUT)
    os.close(master)  # the shim holds its own copy now
    assert not os.path.exists(socket_dir), "console socket dir left behind"


def read_until_eof(nursery: trio.Nursery, path: str) -> bytearray:
    """containerd's client: open the FIFO now (before any output, as containerd
    does before Create) and read it in the background until the shim closes it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    into = bytearray()
    nursery.start_soon(_read_all, fd, into)
    return into


async def _read_all(fd: int, into: bytearray) -> None:
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(1 << 16):
            into += chunk


def winsize(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


# --------------------------------------------------------------------------- output


async def test_output_in_order_and_complete_at_exit(
    tmp_path: Path, pty_pair: tuple[int, int], nursery: trio.Nursery
) -> None:
    master, slave = pty_pair
    tty.setraw(slave)  # no ONLCR: bytes arrive as written
    stdout = fifo(tmp_path, "stdout")
    io = ConsoleIO(StdioSpec(stdout=stdout, terminal=True))
    assert io.runc_fds() == {0: None, 1: None, 2: None}
    await attach(io, master, delay=0.1)
    got = read_until_eof(nursery, stdout)
    io.start(nursery)

    # 4 MiB of numbered lines, the last bytes written right before the "exit".
    payload = b"".join(b"%08d\n" % i for i in range(4 << 20 // 9 + 1))[: 4 << 20]

    def container() -> None:
        view = memoryview(payload)
        while view:
            view = view[os.write(slave, view[: 1 << 16]) :]
        os.close(slave)  # the process exits: no slave open any more

    await trio.to_thread.run_sync(container)
    assert not io.output_done.is_set()
    io.process_exited()
    assert await io.wait_output(TIMEOUT)
    with trio.fail_after(TIMEOUT):
        while len(got) < len(payload):  # the reader may still be draining the FIFO
            await trio.sleep(0.01)
        await trio.sleep(0.05)
    assert len(got) == len(payload)
    assert got == payload
    io.close()


async def test_eio_before_the_slave_is_open_is_not_eof(
    tmp_path: Path, pty_pair: tuple[int, int], nursery: trio.Nursery
) -> None:
    master, slave = pty_pair
    name = os.ttyname(slave)
    os.close(slave)  # nobody has the tty open yet: the master reads EIO
    with pytest.raises(OSError) as exc:
        os.read(master, 1)
    assert exc.value.errno == errno.EIO
    stdout = fifo(tmp_path, "stdout")
    io = ConsoleIO(StdioSpec(stdout=stdout, terminal=True))
    await attach(io, master)
    got = read_until_eof(nursery, stdout)
    io.start(nursery)
    await trio.sleep(0.3)
    assert not io.output_done.is_set(), "EIO ended the output before the process exited"

    slave = os.open(name, os.O_RDWR | os.O_NOCTTY)  # the container opens its tty late
    tty.setraw(slave)
    os.write(slave, b"late output\n")
    await trio.sleep(0.2)
    os.write(slave, b"and more")
    os.close(slave)
    await trio.sleep(0.2)  # hung up again, not exited yet
    assert not io.output_done.is_set()
    io.process_exited()
    assert await io.wait_output(TIMEOUT)
    await trio.sleep(0.05)
    assert got == b"late output\nand more"
    io.close()


async def test_output_ends_after_exit_with_slave_still_open(
    tmp_path: Path, pty_pair: tuple[int, int], nursery: trio.Nursery
) -> None:
    """An orphan keeping the tty open does not hold the output open after the exit."""
    master, slave = pty_pair
    tty.setraw(slave)
    stdout = fifo(tmp_path, "stdout")
    io = ConsoleIO(StdioSpec(stdout=stdout, terminal=True))
    await attach(io, master)
    got = read_until_eof(nursery, stdout)
    io.start(nursery)
    os.write(slave, b"x" * 10000)
    io.process_exited()
    assert await io.wait_output(TIMEOUT)
    await trio.sleep(0.05)
    assert got == b"x" * 10000
    io.close()


async def test_file_stdout_appends(
    tmp_path: Path, pty_pair: tuple[int, int], nursery: trio.Nursery
) -> None:
    master, slave = pty_pair
    tty.setraw(slave)
    log = tmp_path / "logs" / "out.log"
    log.parent.mkdir()
    log.write_bytes(b"before\n")
    io = ConsoleIO(StdioSpec(stdout=f"file://{log}", terminal=True))
    await attach(io, master)
    io.start(nursery)
    os.write(slave, b"from the tty\n")
    os.close(slave)
    io.process_exited()
    assert await io.wait_output(TIMEOUT)
    assert log.read_bytes() == b"before\nfrom the tty\n"
    io.close()


async def test_no_stdout_discards_output(pty_pair: tuple[int, int], nursery: trio.Nursery) -> None:
    master, slave = pty_pair
    tty.setraw(slave)
    io = ConsoleIO(StdioSpec(terminal=True))
    await attach(io, master)
    io.start(nursery)

    def container() -> None:
        os.write(slave, b"y" * (1 << 20))  # would block forever if nobody drained the master
        os.close(slave)

    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(container)
    io.process_exited()
    assert await io.wait_output(TIMEOUT)
    io.close()


async def test_binary_stdout_needs_a_logger_context() -> None:
    with pytest.raises(TTRPCError) as exc:
        ConsoleIO(StdioSpec(stdout="binary:///bin/logger", terminal=True))
    assert exc.value.code == Code.INVALID_ARGUMENT


async def test_binary_logger_gets_the_terminal_output(
    tmp_path: Path, pty_pair: tuple[int, int], nursery: trio.Nursery
) -> None:
    master, slave = pty_pair
    tty.setraw(slave)
    logger = tmp_path / "logger.sh"
    out = tmp_path / "logged"
    logger.write_text('#!/bin/sh\nexec 5>&-\nexec /bin/cat <&3 > "$2"\n')
    logger.chmod(0o755)
    reaper = Reaper()
    await nursery.start(reaper.run)
    context = LoggerContext(reaper.spawn, "c1", "ns")
    io = ConsoleIO(StdioSpec(stdout=f"binary://{logger}?file={out}", terminal=True), context)
    await io.ready()
    await attach(io, master)
    io.start(nursery)
    os.write(slave, b"through the pty to the logger\n")
    os.close(slave)
    io.process_exited()
    assert await io.wait_output(TIMEOUT)
    io.close()  # Delete: the logger sees EOF and exits by itself
    with trio.fail_after(TIMEOUT):
        while not out.exists() or not out.read_bytes():
            await trio.sleep(0.01)
    await io.shutdown_logger()
    assert out.read_bytes() == b"through the pty to the logger\n"


# --------------------------------------------------------------------------- resize


async def test_resize_sets_the_slave_window_size(
    pty_pair: tuple[int, int], nursery: trio.Nursery
) -> None:
    master, slave = pty_pair
    io = ConsoleIO(StdioSpec(terminal=True))
    await attach(io, master)
    io.start(nursery)
    assert winsize(slave) == (0, 0)
    io.resize(120, 40)  # width, height
    assert winsize(slave) == (40, 120)
    io.resize(80, 24)
    assert winsize(slave) == (24, 80)
    io.process_exited()
    io.close()
    io.resize(100, 30)  # after Delete: no pty, nothing to do


# --------------------------------------------------------------------------- stdin


async def read_slave(slave: int, n: int) -> bytes:
    os.set_blocking(slave, False)
    data = b""
    with trio.fail_after(TIMEOUT):
        while len(data) < n:
            try:
                chunk = os.read(slave, n - len(data))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(slave)
                continue
            if not chunk:
                break
            data += chunk
    return data


async def wait_no_fifo_reader(path: str) -> None:
    """The shim closed its end of the stdin FIFO: a non-blocking writer gets ENXIO."""
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                raise
            await trio.sleep(0.02)


async def test_stdin_to_slave_and_close_stdin(
    tmp_path: Path, pty_pair: tuple[int, int], nursery: trio.Nursery
) -> None:
    master, slave = pty_pair
    tty.setraw(slave)
    stdin = fifo(tmp_path, "stdin")
    io = ConsoleIO(StdioSpec(stdin=stdin, terminal=True))
    await attach(io, master)
    io.start(nursery)
    client = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)  # the shim is a reader already
    os.write(client, b"hello\n")
    assert await read_slave(slave, 6) == b"hello\n"

    os.close(client)  # the client goes away (e.g. containerd restarts): no EOF yet
    await trio.sleep(0.1)
    client = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)  # still served
    os.write(client, b"again")
    assert await read_slave(slave, 5) == b"again"

    io.close_stdin()  # CloseIO: only the client's writer is left
    os.write(client, b"!")
    assert await read_slave(slave, 1) == b"!"
    os.close(client)
    await wait_no_fifo_reader(stdin)  # the stdin loop ended
    # raw mode: no VEOF was typed, the output side is untouched
    os.write(slave, b"still here")
    await trio.sleep(0.05)
    assert not io.output_done.is_set()
    io.process_exited()
    assert await io.wait_output(TIMEOUT)
    io.close()


async def test_stdin_eof_reaches_a_canonical_reader(
    tmp_path: Path, pty_pair: tuple[int, int], nursery: trio.Nursery
) -> None:
    master, slave = pty_pair
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO  # canonical, without echo
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    stdin = fifo(tmp_path, "stdin")
    io = ConsoleIO(StdioSpec(stdin=stdin, terminal=True))
    io.close_stdin()  # CloseIO before the process even started (exec race)
    await attach(io, master)
    io.start(nursery)
    client = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
    os.write(client, b"line\npartial")
    os.close(client)  # EOF on stdin
    await wait_no_fifo_reader(stdin)
    os.set_blocking(slave, False)
    got = []
    with trio.fail_after(TIMEOUT):
        while True:  # canonical reads: one line per read, then b"" for EOF
            try:
                chunk = os.read(slave, 100)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(slave)
                continue
            got.append(chunk)
            if not chunk:
                break
    assert got == [b"line\n", b"partial", b""]
    io.process_exited()
    io.close()


# --------------------------------------------------------------------------- console socket


async def test_receive_timeout_cleans_up() -> None:
    before = open_fds()
    io = ConsoleIO(StdioSpec(terminal=True))
    socket_dir = os.path.dirname(io.console_socket)
    with pytest.raises(TTRPCError) as exc:
        await io.receive_master(timeout=0.2)
    assert exc.value.code == Code.UNKNOWN
    assert "failed to receive the console master" in str(exc.value)
    assert "0.2s" in str(exc.value)
    assert not os.path.exists(socket_dir)
    io.close()
    assert io.output_done.is_set()  # never started: Delete must not wait for output
    assert open_fds() == before


@pytest.mark.parametrize(
    ("fds", "message"),
    [
        (0, "expected exactly one fd, got 0"),
        (2, "expected exactly one fd, got more than one"),
        (None, "closed without sending a console"),
    ],
)
async def test_bad_console_message_is_rejected(fds: int | None, message: str) -> None:
    sent = [os.open(os.devnull, os.O_RDONLY) for _ in range(fds or 0)]
    before = open_fds()
    io = ConsoleIO(StdioSpec(terminal=True))
    socket_dir = os.path.dirname(io.console_socket)
    send_console(io.console_socket, None if fds is None else sent)
    with pytest.raises(TTRPCError) as exc:
        await io.receive_master(timeout=TIMEOUT)
    assert exc.value.code == Code.UNKNOWN
    assert message in str(exc.value)
    assert not os.path.exists(socket_dir)
    io.close()
    assert open_fds() == before, "a received fd leaked"
    for fd in sent:
        os.close(fd)


async def test_close_before_receive_removes_the_socket() -> None:
    io = ConsoleIO(StdioSpec(terminal=True))
    socket_dir = os.path.dirname(io.console_socket)
    assert os.path.exists(io.console_socket)
    io.close()
    assert not os.path.exists(socket_dir)
    with pytest.raises(TTRPCError):
        await io.receive_master(timeout=1)


async def test_close_while_receiving_wakes_the_receiver(nursery: trio.Nursery) -> None:
    io = ConsoleIO(StdioSpec(terminal=True))
    socket_dir = os.path.dirname(io.console_socket)

    async def close_soon() -> None:
        await trio.sleep(0.1)
        io.close()

    nursery.start_soon(close_soon)
    with trio.fail_after(5), pytest.raises(TTRPCError, match="socket was closed"):
        await io.receive_master(timeout=TIMEOUT)
    assert not os.path.exists(socket_dir)


async def test_cancelled_receive_cleans_up() -> None:
    sock = ConsoleSocket()
    with trio.move_on_after(0.1):
        await sock.receive(timeout=TIMEOUT)
    assert not os.path.exists(sock.dir)


async def test_setup_failure_cleans_up(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(FileNotFoundError):
        ConsoleIO(StdioSpec(stdin=str(tmp_path / "missing"), terminal=True))
    assert open_fds() == before


async def test_received_master_is_close_on_exec(pty_pair: tuple[int, int]) -> None:
    master, _ = pty_pair
    io = ConsoleIO(StdioSpec(terminal=True))
    threading.Thread(target=send_console, args=(io.console_socket, [master])).start()
    await io.receive_master(timeout=TIMEOUT)
    fd = io._master
    assert fd >= 0 and fd != master
    assert not os.get_inheritable(fd)
    assert not os.get_blocking(fd)
    io.close()
    assert io._master == -1
