"""Process state machine and its error codes (spec: task-api.md §2, §3.5, §5)."""

from __future__ import annotations

import errno

import pytest
import trio
from google.protobuf import timestamp_pb2

from shimv2.process import ZERO_TIME_NS, Process, Status, kill_error
from shimv2.stdio import StdioSpec
from shimv2.ttrpc import Code, TTRPCError


def init() -> Process:
    return Process("c1", "", StdioSpec(stdout="/fifo/out"))


def exec_process() -> Process:
    return Process("c1", "e1", StdioSpec())


def in_state(p: Process, state: str) -> Process:
    if state == "created":
        pass
    elif state == "running":
        p.set_running(100)
    elif state == "paused":
        p.set_running(100)
        p.status = Status.PAUSED
    elif state == "pausing":
        p.set_running(100)
        p.status = Status.PAUSING
    elif state == "stopped":
        p.set_running(100)
        p.set_exited(0, 1)
    elif state == "deleted":
        p.set_running(100)
        p.set_exited(0, 1)
        p.mark_deleted()
    else:
        raise AssertionError(state)
    return p


def raises(fn: object, code: Code, message: str) -> None:
    with pytest.raises(TTRPCError) as info:
        fn()  # type: ignore[operator]
    assert (info.value.code, info.value.message) == (code, message)


def test_zero_time_is_go_zero_time() -> None:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ZERO_TIME_NS)
    assert (ts.seconds, ts.nanos) == (-62135596800, 0)
    assert ts.ToJsonString() == "0001-01-01T00:00:00Z"


def test_new_process() -> None:
    p = init()
    assert p.status == Status.CREATED
    assert (p.pid, p.exit_status, p.exited_at_ns, p.deleted) == (0, 0, None, False)
    assert p.exited_at_or_zero == ZERO_TIME_NS
    assert not p.exited.is_set()
    assert p.is_init and p.id == "c1"
    e = exec_process()
    assert not e.is_init and e.id == "e1"


def test_status_values_match_containerd_enum() -> None:
    assert [int(s) for s in Status] == [0, 1, 2, 3, 4, 5]
    assert [s.name for s in Status] == [
        "UNKNOWN",
        "CREATED",
        "RUNNING",
        "STOPPED",
        "PAUSED",
        "PAUSING",
    ]


# -- Start ----------------------------------------------------------------------


def test_start_allowed_only_when_created() -> None:
    init().begin_start()
    exec_process().begin_start()


@pytest.mark.parametrize("make", [init, exec_process])
@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("running", "cannot start a running process"),
        ("paused", "cannot start a paused process"),
        ("stopped", "cannot start a stopped process"),
        ("deleted", "cannot start a deleted process"),
    ],
)
def test_start_refused(make: object, state: str, message: str) -> None:
    p = in_state(make(), state)  # type: ignore[operator]
    raises(p.begin_start, Code.UNKNOWN, message)


# -- Delete ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [init, exec_process])
@pytest.mark.parametrize("state", ["created", "stopped"])
def test_delete_allowed(make: object, state: str) -> None:
    in_state(make(), state).begin_delete()  # type: ignore[operator]


@pytest.mark.parametrize("make", [init, exec_process])
@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("running", "cannot delete a running process"),
        ("paused", "cannot delete a paused process"),
        ("pausing", "cannot delete a pausing process"),
    ],
)
def test_delete_refused(make: object, state: str, message: str) -> None:
    p = in_state(make(), state)  # type: ignore[operator]
    raises(p.begin_delete, Code.UNKNOWN, message)


@pytest.mark.parametrize("make", [init, exec_process])
def test_delete_of_deleted_is_not_found(make: object) -> None:
    p = in_state(make(), "deleted")  # type: ignore[operator]
    raises(p.begin_delete, Code.NOT_FOUND, "cannot delete a deleted process: not found")


# -- Exec (checks on the init) --------------------------------------------------


@pytest.mark.parametrize("state", ["created", "running"])
def test_exec_allowed(state: str) -> None:
    in_state(init(), state).check_exec()


@pytest.mark.parametrize("state", ["paused", "pausing", "stopped", "deleted"])
def test_exec_refused(state: str) -> None:
    raises(in_state(init(), state).check_exec, Code.UNKNOWN, f"cannot exec in a {state} state")


def test_exec_start_needs_a_running_init() -> None:
    in_state(init(), "running").check_exec_start()
    message = "container c1 init process is not running: failed precondition"
    for state in ("stopped", "deleted"):
        raises(in_state(init(), state).check_exec_start, Code.FAILED_PRECONDITION, message)
    p = in_state(init(), "running")
    p.reaped = True  # its exit is still being handled
    raises(p.check_exec_start, Code.FAILED_PRECONDITION, message)


# -- Kill -----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["created", "running", "paused", "stopped"])
def test_kill_of_init_allowed_in_every_live_state(state: str) -> None:
    in_state(init(), state).check_kill()  # runc decides (→ NOT_FOUND when stopped)


def test_kill_of_deleted_init() -> None:
    p = in_state(init(), "deleted")
    raises(p.check_kill, Code.NOT_FOUND, "cannot kill a deleted process: not found")


def test_kill_of_exec() -> None:
    raises(
        exec_process().check_kill,
        Code.FAILED_PRECONDITION,
        "process not created: failed precondition",
    )
    in_state(exec_process(), "running").check_kill()
    raises(
        in_state(exec_process(), "stopped").check_kill,
        Code.NOT_FOUND,
        "process already finished: not found",
    )
    raises(
        in_state(exec_process(), "deleted").check_kill,
        Code.NOT_FOUND,
        "cannot kill a deleted process: not found",
    )


# -- transitions ----------------------------------------------------------------


def test_set_running() -> None:
    p = init()
    p.set_running(4242)
    assert (p.status, p.pid) == (Status.RUNNING, 4242)


def test_set_running_does_not_resurrect_a_stopped_process() -> None:
    p = init()
    p.pid = 10
    p.set_exited(1, 5)  # the exit raced `runc start`
    p.set_running(10)
    assert p.status == Status.STOPPED


async def test_set_exited_records_and_releases_waiters() -> None:
    p = in_state(init(), "running")
    released = []

    async def waiter() -> None:
        await p.exited.wait()
        released.append((p.exit_status, p.exited_at_ns))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)
        await trio.sleep(0.01)
        assert released == []
        p.set_exited(137, 1_700_000_000_123_456_789)
    assert released == [(137, 1_700_000_000_123_456_789)] * 3
    assert p.status == Status.STOPPED
    assert p.exited_at_or_zero == 1_700_000_000_123_456_789


def test_set_exited_only_once() -> None:
    p = in_state(init(), "running")
    p.set_exited(3, 100)
    p.set_exited(9, 200)
    assert (p.exit_status, p.exited_at_ns) == (3, 100)


def test_set_exited_from_paused() -> None:
    p = in_state(init(), "paused")
    p.set_exited(137, 1)
    assert p.status == Status.STOPPED


async def test_mark_deleted_releases_waiters_of_a_never_started_process() -> None:
    p = init()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.exited.wait)
        await trio.sleep(0.01)
        p.mark_deleted()
    assert p.deleted
    assert p.status == Status.STOPPED
    assert p.exit_status == 0
    assert p.exited_at_or_zero == ZERO_TIME_NS


def test_mark_deleted_keeps_the_exit() -> None:
    p = in_state(init(), "stopped")
    p.set_exited(5, 77)
    p.mark_deleted()
    assert p.deleted
    assert (p.exit_status, p.exited_at_ns) == (0, 1)  # the first exit recorded stays


class FakeIO:
    def __init__(self) -> None:
        self.stdin_closed = 0

    def close_stdin(self) -> None:
        self.stdin_closed += 1


def test_close_stdin_with_io() -> None:
    p = exec_process()
    io = FakeIO()
    p.attach_io(io)  # type: ignore[arg-type]
    assert io.stdin_closed == 0
    p.close_stdin()
    assert io.stdin_closed == 1


def test_close_stdin_before_io_exists_is_remembered() -> None:
    # ctr task exec: CloseIO arrives while Start is still setting up the stdio.
    p = exec_process()
    p.close_stdin()
    io = FakeIO()
    p.attach_io(io)  # type: ignore[arg-type]
    assert io.stdin_closed == 1


# -- kill_error -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "container not running",
        "Container Not Running",
        "os: process already finished",
        "no such process",
        "kill: No Such Process",
        str(ProcessLookupError(errno.ESRCH, "No such process")),
    ],
)
def test_kill_error_already_finished(text: str) -> None:
    err = kill_error(Exception(text))
    assert (err.code, err.message) == (Code.NOT_FOUND, "process already finished: not found")


def test_kill_error_of_process_lookup_error() -> None:
    err = kill_error(ProcessLookupError(errno.ESRCH, "No such process"))
    assert err.code == Code.NOT_FOUND


@pytest.mark.parametrize("text", ["container does not exist", 'container "c1" does not exist'])
def test_kill_error_no_such_container(text: str) -> None:
    err = kill_error(Exception(text))
    assert (err.code, err.message) == (Code.NOT_FOUND, "no such container: not found")


def test_kill_error_other() -> None:
    err = kill_error(Exception("permission denied"))
    assert (err.code, err.message) == (Code.UNKNOWN, "unknown error after kill: permission denied")
