"""The reaper: the only owner of wait4() (spec: io-and-reaping.md §7).

Direct children of the pytest process are reaped here directly. The orphan
test needs a child subreaper, which only a forked child may become
(``fakes.run_in_subreaper``); the pytest process itself never does.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from fakes import is_gone, run_in_subreaper

from shimv2.reaper import Exit, Reaper, exit_status

TIMEOUT = 10


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        yield r
        nursery.cancel_scope.cancel()


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def read_all(fd: int) -> bytes:
    chunks = []
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"]}


def test_exit_status_mapping() -> None:
    assert exit_status(0) == 0
    assert exit_status(3 << 8) == 3
    assert exit_status(255 << 8) == 255
    assert exit_status(signal.SIGKILL) == 137
    assert exit_status(signal.SIGTERM) == 143
    assert exit_status(signal.SIGSEGV | 0x80) == 128 + signal.SIGSEGV  # with core dump


@pytest.mark.parametrize("code", [0, 1, 3, 127, 255])
async def test_spawn_and_wait_exit_code(reaper: Reaper, code: int) -> None:
    child = reaper.spawn(["sh", "-c", f"exit {code}"], env=env())
    with trio.fail_after(TIMEOUT):
        assert await child.wait() == code
    assert child.exit is not None
    assert (child.exit.pid, child.exit.status) == (child.pid, code)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
async def test_signal_exit_is_128_plus_signal(reaper: Reaper, sig: int) -> None:
    child = reaper.spawn(["sh", "-c", f"kill -{int(sig)} $$; sleep 5"], env=env())
    with trio.fail_after(TIMEOUT):
        assert await child.wait() == 128 + sig


async def test_exit_timestamp(reaper: Reaper) -> None:
    before = time.time_ns()
    child = reaper.spawn(["true"], env=env())
    with trio.fail_after(TIMEOUT):
        await child.wait()
    assert child.exit is not None
    assert before <= child.exit.timestamp_ns <= time.time_ns()


async def test_spawn_missing_program_registers_nothing(reaper: Reaper) -> None:
    fds = open_fds()
    with pytest.raises(FileNotFoundError):
        reaper.spawn(["/nonexistent/program"], env=env(), fds={1: 1})
    with pytest.raises(FileNotFoundError):
        reaper.spawn(["no-such-program-anywhere"], env=env())
    assert reaper._children == {}
    assert open_fds() == fds  # the temporary fd copies are closed again


async def test_spawn_looks_a_program_up_once_and_again_when_it_moved(
    reaper: Reaper, tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for directory, code in ((first, 3), (second, 4)):
        directory.mkdir()
        (directory / "prog").write_text(f"#!/bin/sh\nexit {code}\n")
        (directory / "prog").chmod(0o755)
    path = f"{first}:{second}:/usr/bin:/bin"
    assert await reaper.spawn(["prog"], env={"PATH": path}).wait() == 3
    assert reaper._programs[("prog", path)] == str(first / "prog")
    (first / "prog").unlink()
    assert await reaper.spawn(["prog"], env={"PATH": path}).wait() == 4


async def test_spawn_not_executable(reaper: Reaper, tmp_path: trio.Path) -> None:
    script = os.path.join(str(tmp_path), "script")
    with open(script, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    with pytest.raises(PermissionError):
        reaper.spawn([script], env=env())
    assert reaper._children == {}


async def test_stdout_mapping(reaper: Reaper) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    child = reaper.spawn(["sh", "-c", "echo out; echo err >&2"], env=env(), fds={1: w, 2: w})
    os.close(w)
    with trio.fail_after(TIMEOUT):
        assert await read_all(r) == b"out\nerr\n"
        assert await child.wait() == 0


async def test_unmapped_stdio_is_dev_null(reaper: Reaper) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    script = "readlink /proc/self/fd/0; readlink /proc/self/fd/2"
    child = reaper.spawn(["sh", "-c", script], env=env(), fds={0: None, 1: w})
    os.close(w)
    with trio.fail_after(TIMEOUT):
        assert await read_all(r) == b"/dev/null\n/dev/null\n"
        await child.wait()


async def test_stdin_mapping(reaper: Reaper) -> None:
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    child = reaper.spawn(["cat"], env=env(), fds={0: in_r, 1: out_w})
    os.close(in_r)
    os.close(out_w)
    os.write(in_w, b"through cat")
    os.close(in_w)
    with trio.fail_after(TIMEOUT):
        assert await read_all(out_r) == b"through cat"
        assert await child.wait() == 0


def free_fd_pair() -> tuple[int, int]:
    """Two adjacent fd numbers that are not open here."""
    fds = open_fds()
    n = 100
    while n in fds or n + 1 in fds:
        n += 2
    return n, n + 1


async def test_swapped_fd_mapping(reaper: Reaper) -> None:
    # Our fd A goes to the child's B and our B to the child's A: a naive
    # dup2 sequence would clobber one source with the other.
    a_r, a_w = os.pipe2(os.O_CLOEXEC)
    b_r, b_w = os.pipe2(os.O_CLOEXEC)
    fd_a, fd_b = free_fd_pair()
    os.dup2(a_w, fd_a, inheritable=False)
    os.dup2(b_w, fd_b, inheritable=False)
    os.close(a_w)
    os.close(b_w)
    script = f"import os; os.write({fd_a}, b'to-{fd_a}\\n'); os.write({fd_b}, b'to-{fd_b}\\n')"
    child = reaper.spawn(
        [sys.executable, "-S", "-c", script], env=env(), fds={fd_a: fd_b, fd_b: fd_a}
    )
    os.close(fd_a)
    os.close(fd_b)
    with trio.fail_after(TIMEOUT):
        assert await read_all(b_r) == f"to-{fd_a}\n".encode()
        assert await read_all(a_r) == f"to-{fd_b}\n".encode()
        assert await child.wait() == 0


async def test_swap_of_stdout_and_stderr_numbers(reaper: Reaper) -> None:
    # {1: x, 2: y} where x and y are each other's target numbers (x == 2, y == 1)
    # is what a shim sees if its own stdio slots were reused by pipes. Emulate it
    # with targets 1/2 whose sources are fds numbered like the other target.
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(err_w, 1)  # our fd 1 is the "stderr" pipe
        os.dup2(out_w, 2)  # our fd 2 is the "stdout" pipe
        child = reaper.spawn(["sh", "-c", "echo out; echo err >&2"], env=env(), fds={1: 2, 2: 1})
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, out_w, err_w):
            os.close(fd)
    with trio.fail_after(TIMEOUT):
        assert await read_all(out_r) == b"out\n"
        assert await read_all(err_r) == b"err\n"
        assert await child.wait() == 0


async def test_spawn_leaks_no_fds(reaper: Reaper) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    before = open_fds()
    child = reaper.spawn(["true"], env=env(), fds={1: w, 2: w, 5: r})
    assert open_fds() == before
    os.close(r)
    os.close(w)
    with trio.fail_after(TIMEOUT):
        await child.wait()


async def test_unmapped_fds_do_not_reach_the_child(reaper: Reaper) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    other_r, other_w = os.pipe2(os.O_CLOEXEC)
    try:
        child = reaper.spawn(["ls", "/proc/self/fd"], env=env(), fds={1: w})
        os.close(w)
        with trio.fail_after(TIMEOUT):
            listing = {int(n) for n in (await read_all(r)).split()}
            await child.wait()
    finally:
        os.close(other_r)
        os.close(other_w)
    # 0-2 plus the directory fd ls itself opens; none of our close-on-exec fds
    # (fds this process inherited without CLOEXEC from its own parent may show).
    assert {0, 1, 2} <= listing
    assert not {r, other_r, other_w} & listing


async def test_environment_is_exactly_the_given_one(reaper: Reaper) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    child = reaper.spawn(
        ["sh", "-c", "env | sort"], env={"PATH": "/usr/bin:/bin", "ONLY": "this"}, fds={1: w}
    )
    os.close(w)
    with trio.fail_after(TIMEOUT):
        lines = set((await read_all(r)).decode().splitlines())
        await child.wait()
    assert "ONLY=this" in lines
    assert not any(line.startswith("HOME=") for line in lines)


async def test_sigpipe_is_default_in_the_child(reaper: Reaper) -> None:
    # Python ignores SIGPIPE; an ignored disposition would survive exec.
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    r, w = os.pipe2(os.O_CLOEXEC)
    child = reaper.spawn(["grep", "^SigIgn", "/proc/self/status"], env=env(), fds={1: w})
    os.close(w)
    with trio.fail_after(TIMEOUT):
        line = (await read_all(r)).decode()
        await child.wait()
    ignored = int(line.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))


async def test_many_children_all_collected(reaper: Reaper) -> None:
    children = [reaper.spawn(["sh", "-c", f"exit {i}"], env=env()) for i in range(30)]
    with trio.fail_after(TIMEOUT):
        for i, child in enumerate(children):
            assert await child.wait() == i
    assert reaper._children == {}


async def test_listeners_get_every_exit_including_unknown_pids(reaper: Reaper) -> None:
    seen: list[Exit] = []
    reaper.subscribe(seen.append)
    # A child the reaper did not spawn (e.g. started by a library).
    foreign = os.posix_spawnp("sh", ["sh", "-c", "exit 9"], env())
    known = reaper.spawn(["sh", "-c", "exit 4"], env=env())
    with trio.fail_after(TIMEOUT):
        await known.wait()
        while not any(e.pid == foreign for e in seen):
            await trio.sleep(0.01)
    by_pid = {e.pid: e.status for e in seen}
    assert by_pid[foreign] == 9
    assert by_pid[known.pid] == 4


async def test_listener_failure_does_not_stop_others(reaper: Reaper) -> None:
    seen: list[int] = []

    def broken(e: Exit) -> None:
        raise RuntimeError("listener bug")

    reaper.subscribe(broken)
    reaper.subscribe(lambda e: seen.append(e.pid))
    child = reaper.spawn(["true"], env=env())
    with trio.fail_after(TIMEOUT):
        assert await child.wait() == 0
    assert child.pid in seen


async def test_listeners_run_synchronously_before_wait_returns(reaper: Reaper) -> None:
    seen: list[int] = []
    reaper.subscribe(lambda e: seen.append(e.pid))
    child = reaper.spawn(["true"], env=env())
    with trio.fail_after(TIMEOUT):
        await child.wait()
    assert seen == [child.pid]


async def test_exit_before_the_reaper_runs_is_delivered() -> None:
    r = Reaper()
    seen: list[Exit] = []
    r.subscribe(seen.append)
    child = r.spawn(["sh", "-c", "exit 6"], env=env())
    # The child is a zombie before the reaper task even exists: its SIGCHLD
    # came before any signal receiver was installed.
    deadline = time.monotonic() + TIMEOUT
    while not is_gone(child.pid):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        with trio.fail_after(TIMEOUT):
            assert await child.wait() == 6
        nursery.cancel_scope.cancel()
    assert [(e.pid, e.status) for e in seen] == [(child.pid, 6)]


def test_reap_without_children_returns_nothing() -> None:
    assert Reaper().reap() == []


def test_reap_is_synchronous_and_returns_exits() -> None:
    async def body() -> list[tuple[int, int]]:
        r = Reaper()
        child = r.spawn(["sh", "-c", "exit 2"], env=env())
        exits: list[Exit] = []
        deadline = time.monotonic() + TIMEOUT
        while not exits and time.monotonic() < deadline:
            exits = r.reap()
            time.sleep(0.005)
        assert child.exit is not None
        return [(e.pid - child.pid, e.status) for e in exits]

    assert trio.run(body) == [(0, 2)]


async def _orphan_scenario() -> dict[str, object]:
    r = Reaper()
    seen: list[Exit] = []
    r.subscribe(seen.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        # sh starts a background grandchild, prints its pid and exits at once:
        # the grandchild is re-parented to us, the subreaper.
        child = r.spawn(["sh", "-c", "sleep 0.2 & echo $!; exit 0"], env=env(), fds={1: write_end})
        os.close(write_end)
        grandchild = int((await read_all(read_end)).decode())
        with trio.fail_after(TIMEOUT):
            assert await child.wait() == 0
            while not any(e.pid == grandchild for e in seen):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    statuses = {e.pid: e.status for e in seen}
    return {"grandchild_status": statuses[grandchild], "known": grandchild in r._children}


def test_orphaned_grandchild_exit_reaches_listeners_in_a_subreaper() -> None:
    result = run_in_subreaper(_orphan_scenario)
    assert result == {"grandchild_status": 0, "known": False}
