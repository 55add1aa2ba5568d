"""Container stdio without a terminal (spec: io-and-reaping.md §1-3, §5, §6).

Real FIFOs in tmp_path play the client (containerd/ctr) side; the test plays
the container by writing to / reading from the fds PipeIO hands to runc.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
import trio

from shimv2.reaper import Reaper
from shimv2.stdio import LoggerContext, PipeIO, StdioSpec, logger_argv, pump
from shimv2.ttrpc import Code, TTRPCError

TIMEOUT = 10


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def mkfifo(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    os.mkfifo(path, 0o700)
    return str(path)


def client_reader(path: str) -> int:
    """containerd's side of an output FIFO (never blocks to open)."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


async def read_until_eof(fd: int, limit: int = 1 << 30) -> bytes:
    chunks = []
    total = 0
    while total < limit:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def read_now(fd: int) -> bytes | None:
    """What can be read right now; None if the read would block (a writer is open)."""
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return None


async def write_and_close(fd: int, data: bytes) -> None:
    async with trio.lowlevel.FdStream(fd) as stream:
        await stream.send_all(data)


def container_ends(io: PipeIO) -> dict[int, int]:
    """Dup the fds runc would hand to the container, then drop PipeIO's copies."""
    ends = {target: os.dup(fd) for target, fd in io.runc_fds().items() if fd is not None}
    io.close_after_start()
    return ends


def pattern(size: int) -> bytes:
    block = bytes(range(256))
    return (block * (size // 256 + 1))[:size]


def test_stdio_spec_is_null() -> None:
    assert StdioSpec().is_null
    assert not StdioSpec(stdout="/x").is_null
    assert not StdioSpec(stdin="/x").is_null


async def test_null_io() -> None:
    fds = open_fds()
    io = PipeIO(StdioSpec())
    assert io.runc_fds() == {0: None, 1: None, 2: None}
    assert io.output_done.is_set()
    assert await io.wait_output(0.01)
    io.close()
    assert open_fds() == fds


async def test_stdout_fifo_copies_1mib_in_order(tmp_path: Path) -> None:
    path = mkfifo(tmp_path, "stdout")
    io = PipeIO(StdioSpec(stdout=path))  # no reader yet: opening must not block
    reader = client_reader(path)
    ends = container_ends(io)
    assert set(ends) == {1}
    data = pattern(1 << 20)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                io.start(nursery)
                nursery.start_soon(write_and_close, ends[1], data)
                got = await read_until_eof(reader)
        assert len(got) == len(data)
        assert got == data
        assert io.output_done.is_set()
    finally:
        os.close(reader)
        io.close()


async def test_container_eof_closes_the_fifo_writer(tmp_path: Path) -> None:
    path = mkfifo(tmp_path, "stdout")
    reader = client_reader(path)
    io = PipeIO(StdioSpec(stdout=path))
    ends = container_ends(io)
    try:
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            os.write(ends[1], b"partial")
            got = b""
            with trio.fail_after(TIMEOUT):
                while got != b"partial":
                    await trio.lowlevel.wait_readable(reader)
                    got += read_now(reader) or b""
            assert read_now(reader) is None  # still open: no EOF yet
            os.close(ends[1])  # the container exits
            with trio.fail_after(TIMEOUT):
                assert await read_until_eof(reader) == b""
                await io.output_done.wait()
    finally:
        os.close(reader)
        io.close()


async def test_output_that_ended_before_the_start_needs_no_copy_loop(tmp_path: Path) -> None:
    """A short exec is often gone when `runc exec` returns: its empty output is done
    at once (the exit is then recorded without waiting), and the client sees EOF;
    output that has data, or a writer left, still gets its loop."""
    out, err = mkfifo(tmp_path, "stdout"), mkfifo(tmp_path, "stderr")
    out_reader, err_reader = client_reader(out), client_reader(err)
    io = PipeIO(StdioSpec(stdout=out, stderr=err))
    ends = container_ends(io)
    os.close(ends[1])  # exited without a word on stdout
    os.write(ends[2], b"last words")  # and with some on stderr
    os.close(ends[2])
    before = open_fds()
    try:
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            assert len(open_fds()) == len(before) - 2  # stdout's pipe and FIFO fds: closed
            assert not io.output_done.is_set()  # stderr's bytes are still on their way
            with trio.fail_after(TIMEOUT):
                assert await read_until_eof(err_reader) == b"last words"
                await io.output_done.wait()
        assert read_now(out_reader) == b""  # EOF: no writer left
    finally:
        os.close(out_reader)
        os.close(err_reader)
        io.close()


async def test_output_with_nothing_at_all_is_done_at_start(tmp_path: Path) -> None:
    out = mkfifo(tmp_path, "stdout")
    reader = client_reader(out)
    io = PipeIO(StdioSpec(stdout=out))
    os.close(container_ends(io)[1])
    try:
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            assert io.output_done.is_set()  # before any await
            assert len(nursery.child_tasks) == 0
    finally:
        os.close(reader)
        io.close()


async def test_stdout_and_stderr_to_the_same_fifo_share_it(tmp_path: Path) -> None:
    path = mkfifo(tmp_path, "out")
    reader = client_reader(path)
    io = PipeIO(StdioSpec(stdout=path, stderr=path))
    ends = container_ends(io)
    assert set(ends) == {1, 2}
    got = b""
    try:
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            os.write(ends[1], b"out\n")
            os.close(ends[1])
            with trio.fail_after(TIMEOUT):
                while got != b"out\n":
                    await trio.lowlevel.wait_readable(reader)
                    got += read_now(reader) or b""
            await trio.sleep(0.1)  # the stdout loop has ended by now
            # The stderr loop still holds its own copy: no EOF for the reader.
            assert read_now(reader) is None
            assert not io.output_done.is_set()
            os.write(ends[2], b"err\n")
            os.close(ends[2])
            with trio.fail_after(TIMEOUT):
                got += await read_until_eof(reader)
                await io.output_done.wait()
        assert sorted(got.splitlines()) == [b"err", b"out"]
    finally:
        os.close(reader)
        io.close()


async def test_separate_stdout_and_stderr_fifos(tmp_path: Path) -> None:
    out_path, err_path = mkfifo(tmp_path, "out"), mkfifo(tmp_path, "err")
    out_r, err_r = client_reader(out_path), client_reader(err_path)
    io = PipeIO(StdioSpec(stdout=out_path, stderr=err_path))
    ends = container_ends(io)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                io.start(nursery)
                nursery.start_soon(write_and_close, ends[1], b"to stdout")
                nursery.start_soon(write_and_close, ends[2], b"to stderr")
                assert await read_until_eof(out_r) == b"to stdout"
                assert await read_until_eof(err_r) == b"to stderr"
    finally:
        os.close(out_r)
        os.close(err_r)
        io.close()


async def test_regular_file_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"old\n")
    io = PipeIO(StdioSpec(stdout=str(path), stderr=str(path)))
    ends = container_ends(io)
    try:
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            os.write(ends[1], b"one\n")
            os.close(ends[1])
            with trio.fail_after(TIMEOUT):
                while path.read_bytes() == b"old\n":
                    await trio.sleep(0.01)
            os.write(ends[2], b"two\n")
            os.close(ends[2])
            with trio.fail_after(TIMEOUT):
                assert await io.wait_output(TIMEOUT)
        assert path.read_bytes() == b"old\none\ntwo\n"
    finally:
        io.close()


async def test_regular_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PipeIO(StdioSpec(stdout=str(tmp_path / "missing.log")))


async def test_file_uri_creates_the_file(tmp_path: Path) -> None:
    target = tmp_path / "logs" / "deep" / "c1.log"
    uri = f"file://{target}"
    io = PipeIO(StdioSpec(stdout=uri, stderr=uri))
    assert target.exists()
    assert stat.S_ISREG(target.stat().st_mode)
    ends = container_ends(io)
    try:
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            os.write(ends[1], b"a\n")
            os.close(ends[1])
            os.write(ends[2], b"b\n")
            os.close(ends[2])
            with trio.fail_after(TIMEOUT):
                assert await io.wait_output(TIMEOUT)
        assert sorted(target.read_bytes().splitlines()) == [b"a", b"b"]
    finally:
        io.close()


async def test_file_uri_appends_to_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "c1.log"
    target.write_bytes(b"before\n")
    io = PipeIO(StdioSpec(stdout=f"file://{target}"))
    ends = container_ends(io)
    try:
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            os.write(ends[1], b"after\n")
            os.close(ends[1])
            with trio.fail_after(TIMEOUT):
                assert await io.wait_output(TIMEOUT)
        assert target.read_bytes() == b"before\nafter\n"
    finally:
        io.close()


@pytest.mark.parametrize("uri", ["http://example.com/x", "tcp://1.2.3.4:5", "s3://bucket/key"])
async def test_unknown_scheme_is_invalid_argument(tmp_path: Path, uri: str) -> None:
    with pytest.raises(TTRPCError) as info:
        PipeIO(StdioSpec(stdout=uri))
    assert info.value.code == Code.INVALID_ARGUMENT
    scheme = uri.split(":", 1)[0]
    assert info.value.message == f"unknown STDIO scheme {scheme}: invalid argument"


async def test_unknown_scheme_for_stderr_only(tmp_path: Path) -> None:
    out = mkfifo(tmp_path, "out")
    with pytest.raises(TTRPCError) as info:
        PipeIO(StdioSpec(stdout=out, stderr="http://x"))
    assert info.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "case", ["unknown-scheme", "unknown-scheme-stderr", "missing-file", "bad-file-uri"]
)
async def test_failed_setup_leaks_no_fds(tmp_path: Path, case: str) -> None:
    out = mkfifo(tmp_path, "out")
    (tmp_path / "plain").write_text("")
    specs = {
        "unknown-scheme": StdioSpec(stdout="http://x/y"),
        "unknown-scheme-stderr": StdioSpec(stdout=out, stderr="http://x/y"),
        "missing-file": StdioSpec(stdout=str(tmp_path / "missing.log")),
        # a file:// URI whose directory cannot be created (a file is in the way)
        "bad-file-uri": StdioSpec(stdout=f"file://{tmp_path}/plain/sub/log"),
    }
    fds = open_fds()
    with pytest.raises((TTRPCError, OSError)):
        PipeIO(specs[case])
    assert open_fds() == fds


async def test_binary_scheme_without_logger_support(tmp_path: Path) -> None:
    with pytest.raises(TTRPCError) as info:
        PipeIO(StdioSpec(stdout="binary:///usr/bin/logger"))
    assert info.value.code == Code.INVALID_ARGUMENT


def test_container_ends_are_owned_by_io_uid_gid(tmp_path: Path) -> None:
    spec = StdioSpec(
        stdin=mkfifo(tmp_path, "in"), stdout=mkfifo(tmp_path, "out"), stderr=mkfifo(tmp_path, "err")
    )
    io = PipeIO(spec, 1000, 2000)
    try:
        for target, fd in io.runc_fds().items():
            assert fd is not None
            st = os.fstat(fd)
            assert (target, st.st_uid, st.st_gid) == (target, 1000, 2000)
    finally:
        io.close()


def test_both_ends_of_an_output_copy_get_big_pipe_buffers(tmp_path: Path) -> None:
    """1 MiB on the container's pipe and on the client's FIFO: fewer wake-ups per byte."""
    path = mkfifo(tmp_path, "out")
    io = PipeIO(StdioSpec(stdout=path))
    reader = client_reader(path)
    try:
        assert fcntl.fcntl(io.runc_fds()[1], fcntl.F_GETPIPE_SZ) == 1 << 20
        assert fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ) == 1 << 20  # one pipe, both ends
    finally:
        os.close(reader)
        io.close()


def test_container_ends_are_close_on_exec_and_blocking(tmp_path: Path) -> None:
    spec = StdioSpec(stdin=mkfifo(tmp_path, "in"), stdout=mkfifo(tmp_path, "out"))
    io = PipeIO(spec)
    try:
        for fd in io.runc_fds().values():
            if fd is not None:
                assert not os.get_inheritable(fd)  # only the spawn maps them in
                assert os.get_blocking(fd)  # the container gets ordinary pipes
    finally:
        io.close()


async def test_stdin_fifo_to_container(tmp_path: Path) -> None:
    path = mkfifo(tmp_path, "stdin")
    io = PipeIO(StdioSpec(stdin=path))
    # The client (ctr) opens its writer; possible at once since we hold a reader.
    client = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    ends = container_ends(io)
    assert set(ends) == {0}
    os.set_blocking(ends[0], False)
    try:
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            os.write(client, b"hello\n")
            with trio.fail_after(TIMEOUT):
                assert await read_until_eof(ends[0], limit=6) == b"hello\n"
            os.close(client)
            client = -1
            # The keep-alive writer means no EOF for the container: a client that
            # goes away (containerd restart, ctr detach) does not end stdin.
            await trio.sleep(0.2)
            assert read_now(ends[0]) is None
            io.close_stdin()  # CloseIO
            with trio.fail_after(TIMEOUT):
                assert await read_until_eof(ends[0]) == b""
    finally:
        if client >= 0:
            os.close(client)
        os.close(ends[0])
        io.close()


async def test_close_stdin_then_client_closes(tmp_path: Path) -> None:
    path = mkfifo(tmp_path, "stdin")
    io = PipeIO(StdioSpec(stdin=path))
    client = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    ends = container_ends(io)
    os.set_blocking(ends[0], False)
    try:
        async with trio.open_nursery() as nursery:
            io.start(nursery)
            io.close_stdin()
            await trio.sleep(0.1)
            assert read_now(ends[0]) is None  # the client's writer is still open
            os.write(client, b"last words")
            os.close(client)
            client = -1
            with trio.fail_after(TIMEOUT):
                assert await read_until_eof(ends[0]) == b"last words"
    finally:
        if client >= 0:
            os.close(client)
        os.close(ends[0])
        io.close()


async def test_close_stdin_before_start(tmp_path: Path) -> None:
    # CloseIO can arrive before the copy loops run (ctr task exec races it with Start).
    path = mkfifo(tmp_path, "stdin")
    io = PipeIO(StdioSpec(stdin=path))
    client = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.write(client, b"data")
    os.close(client)
    io.close_stdin()
    ends = container_ends(io)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                io.start(nursery)
                os.set_blocking(ends[0], False)
                assert await read_until_eof(ends[0]) == b"data"
    finally:
        os.close(ends[0])
        io.close()


async def test_no_fifo_open_blocks_without_peers(tmp_path: Path) -> None:
    spec = StdioSpec(
        stdin=mkfifo(tmp_path, "in"), stdout=mkfifo(tmp_path, "out"), stderr=mkfifo(tmp_path, "err")
    )
    fds = open_fds()
    # In a thread, so that a blocking open(2) fails the test instead of hanging it.
    with trio.move_on_after(5) as scope:
        io = await trio.to_thread.run_sync(PipeIO, spec, abandon_on_cancel=True)
    if scope.cancelled_caught:
        # Unblock the stuck thread by playing every peer, then fail.
        for path, flags in ((spec.stdin, os.O_WRONLY), (spec.stdout, 0), (spec.stderr, 0)):
            with contextlib.suppress(OSError):
                os.close(os.open(path, flags | os.O_NONBLOCK))
        pytest.fail("opening the stdio FIFOs blocked without a peer")
    io.close()
    assert open_fds() == fds


async def test_broken_destination_does_not_stop_draining(tmp_path: Path) -> None:
    # /dev/full fails every write with ENOSPC; the container must still be able
    # to write everything (far more than any pipe holds) and reach EOF.
    io = PipeIO(StdioSpec(stdout="/dev/full"))
    ends = container_ends(io)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                io.start(nursery)
                await write_and_close(ends[1], pattern(4 << 20))
                await io.output_done.wait()
    finally:
        io.close()


async def test_pump_keeps_draining_after_epipe() -> None:
    src_r, src_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    dst_r, dst_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.close(dst_r)  # nobody reads: every write fails with EPIPE
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, src_r, dst_w)
            await write_and_close(src_w, pattern(3 << 20))
    with pytest.raises(OSError) as info:
        os.fstat(src_r)  # pump closed both ends
    assert info.value.errno == errno.EBADF


async def test_close_releases_every_fd(tmp_path: Path) -> None:
    spec = StdioSpec(
        stdin=mkfifo(tmp_path, "in"), stdout=mkfifo(tmp_path, "out"), stderr=mkfifo(tmp_path, "err")
    )
    fds = open_fds()
    io = PipeIO(spec)
    assert len(open_fds()) > len(fds)
    io.close()
    assert open_fds() == fds
    io.close()  # idempotent


async def test_close_after_copy_loops_ran(tmp_path: Path) -> None:
    spec = StdioSpec(stdin=mkfifo(tmp_path, "in"), stdout=mkfifo(tmp_path, "out"))
    fds = open_fds()
    io = PipeIO(spec)
    ends = container_ends(io)
    async with trio.open_nursery() as nursery:
        io.start(nursery)
        os.close(ends[1])
        with trio.fail_after(TIMEOUT):
            await io.output_done.wait()
        io.close()  # releases the stdin keep-alive: the stdin loop ends too
    os.close(ends[0])
    assert open_fds() == fds


def test_logger_argv() -> None:
    assert logger_argv("binary:///usr/bin/logger") == ["/usr/bin/logger"]
    assert logger_argv("binary:///usr/bin/logger?tag=web&json") == [
        "/usr/bin/logger",
        "tag",
        "web",
        "json",
    ]
    assert logger_argv("binary:///bin/x?a=1%202") == ["/bin/x", "a", "1 2"]


def test_logger_argv_without_path() -> None:
    with pytest.raises(TTRPCError) as info:
        logger_argv("binary://")
    assert info.value.code == Code.INVALID_ARGUMENT


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        yield r
        nursery.cancel_scope.cancel()


async def test_binary_logger(tmp_path: Path, reaper: Reaper) -> None:
    out = tmp_path / "logged"
    envfile = tmp_path / "env"
    script = f"env > {envfile}; exec 5>&-; /bin/cat <&3 > {out}; /bin/cat <&4 >> {out}"
    uri = f"binary:///bin/sh?-c={quote(script)}"
    ctx = LoggerContext(spawn=reaper.spawn, process_id="c1", namespace="unitns")
    io = PipeIO(StdioSpec(stdout=uri, stderr=uri), logger=ctx)
    try:
        assert io.output_done.is_set()  # nothing for the shim to copy
        with trio.fail_after(TIMEOUT):
            await io.ready()
        fds = io.runc_fds()
        assert fds[1] is not None and fds[2] is not None
        os.write(fds[1], b"from stdout\n")
        os.write(fds[2], b"from stderr\n")
        io.close()  # Delete: the logger sees EOF on fds 3 and 4
        with trio.fail_after(TIMEOUT):
            while b"from stderr" not in (out.read_bytes() if out.exists() else b""):
                await trio.sleep(0.01)
            await io.shutdown_logger(timeout=5)
        assert out.read_bytes() == b"from stdout\nfrom stderr\n"
        env = dict(line.split("=", 1) for line in envfile.read_text().splitlines())
        assert env["CONTAINER_ID"] == "c1"
        assert env["CONTAINER_NAMESPACE"] == "unitns"
        assert "HOME" not in env and "FAKE_RUNC_RECORD" not in env
    finally:
        io.close()
        await io.shutdown_logger(timeout=1)


async def test_binary_logger_that_exits_early(tmp_path: Path, reaper: Reaper) -> None:
    ctx = LoggerContext(spawn=reaper.spawn, process_id="c1", namespace="unitns")
    io = PipeIO(StdioSpec(stdout="binary:///bin/false"), logger=ctx)
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(TTRPCError) as info:
            await io.ready()
        assert info.value.code == Code.UNKNOWN
        assert "exited with status 1" in info.value.message
    finally:
        io.close()


async def test_binary_logger_missing_program(reaper: Reaper) -> None:
    ctx = LoggerContext(spawn=reaper.spawn, process_id="c1", namespace="unitns")
    fds = open_fds()
    with pytest.raises(TTRPCError) as info:
        PipeIO(StdioSpec(stdout="binary:///no/such/logger"), logger=ctx)
    assert info.value.code == Code.UNKNOWN
    assert "failed to start logging binary /no/such/logger" in info.value.message
    assert open_fds() == fds
