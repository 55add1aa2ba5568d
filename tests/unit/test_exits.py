"""Exit matching (shimv2/exits.py) and the exit handling it starts (Container.handle_exit).

The reaper is not run here: exits are handed to :meth:`ExitMatcher.on_exit` as
the reaper would hand them, with pids no process of this test has, except where
the init's exit must kill a running exec (a real ``sleep`` child then).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any, cast

import trio
import trio.testing

from shimv2 import bundle as bundlefiles
from shimv2.container import Container
from shimv2.events import Publisher
from shimv2.exits import ExitMatcher
from shimv2.options import ShimOptions
from shimv2.process import Process, Status
from shimv2.reaper import Exit, Reaper
from shimv2.stdio import StdioSpec
from shimv2.tasks import GuardedNursery

# Far above any pid_max: no process can have them, so nothing is ever signalled.
INIT_PID, EXEC_PID, OTHER_PID = 1 << 23, (1 << 23) + 1, (1 << 23) + 2


class Events:
    """A Publisher's publish(), recorded."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []

    def publish(self, topic: str, message: Any) -> None:
        self.published.append((topic, message))

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.published]

    def exits(self) -> list[tuple[str, int, int]]:
        """(process id, pid, exit status) of each /tasks/exit."""
        return [(m.id, m.pid, m.exit_status) for t, m in self.published if t == "/tasks/exit"]


class Shim:
    def __init__(self, tmp_path: Path, nursery: trio.Nursery) -> None:
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.events = Events()
        self.exits = ExitMatcher(GuardedNursery(nursery, "test"))

    async def container(self, cid: str = "c1") -> Container:
        bundle = self.tmp_path / cid
        bundle.mkdir()
        init = Process(cid, "", StdioSpec())
        own_pid_namespace = {"namespaces": [{"type": "pid"}]}  # no `runc kill --all`
        publisher = cast(Publisher, self.events)
        container = Container(
            cid, str(bundle), "ns", ShimOptions(), init, own_pid_namespace, Reaper(), publisher
        )
        await self.nursery.start(container.run)
        return container

    def start(self, container: Container, process: Process, pid: int) -> None:
        """What Start does around the exit matcher, with no exit racing it."""
        subscriber = self.exits.subscribe()
        process.set_running(pid)
        self.exits.started(container, process, subscriber)

    def start_exec(self, container: Container, exec_id: str, pid: int) -> Process:
        process = container.add_exec(exec_id, StdioSpec(), b"{}")
        container.exec_started()
        self.start(container, process, pid)
        return process


async def settle() -> None:
    """Let the exit handlers run as far as they can."""
    await trio.testing.wait_all_tasks_blocked()


async def test_the_exit_of_a_started_process_is_handled(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    init = container.init
    shim.start(container, init, INIT_PID)
    shim.exits.on_exit(Exit(INIT_PID, 3, 1_700_000_000_123_456_789))
    assert init.reaped  # at once: nothing may signal or restart it from here
    await settle()
    assert shim.events.exits() == [("c1", INIT_PID, 3)]
    [(_, message)] = shim.events.published
    assert message.container_id == "c1"
    assert message.exited_at.ToNanoseconds() == 1_700_000_000_123_456_789
    assert (init.status, init.exit_status) == (Status.STOPPED, 3)
    assert init.exited_at_ns == 1_700_000_000_123_456_789
    assert init.exited.is_set()
    record = bundlefiles.read_exit(container.bundle)
    assert record == bundlefiles.ExitRecord(INIT_PID, 3, 1_700_000_000_123_456_789)


async def test_an_exit_before_the_pid_is_known_waits_until_started(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The early-exit race: the process exits while runc start/exec has not returned."""
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    init = container.init
    subscriber = shim.exits.subscribe()
    shim.exits.on_exit(Exit(INIT_PID, 1, 5))  # during `runc start`
    await settle()
    assert not init.reaped and shim.events.published == []  # held, not handled
    init.set_running(INIT_PID)
    shim.events.publish("/tasks/start", None)
    shim.exits.started(container, init, subscriber)
    assert init.reaped
    await settle()
    assert shim.events.topics() == ["/tasks/start", "/tasks/exit"]
    assert shim.events.exits() == [("c1", INIT_PID, 1)]
    # Handled from the subscriber, so its pid was never watched: a later process
    # with the same pid is not taken for it.
    shim.exits.on_exit(Exit(INIT_PID, 0, 6))
    await settle()
    assert len(shim.events.exits()) == 1


async def test_an_exit_of_an_unknown_pid_is_ignored(tmp_path: Path, nursery: trio.Nursery) -> None:
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    shim.start(container, container.init, INIT_PID)
    shim.exits.on_exit(Exit(OTHER_PID, 0, 1))  # runc, a logger, an orphan
    await settle()
    assert not container.init.reaped
    assert shim.events.published == []
    shim.exits.on_exit(Exit(INIT_PID, 0, 2))
    await settle()
    assert shim.events.exits() == [("c1", INIT_PID, 0)]


async def test_exec_and_init_exits(tmp_path: Path, nursery: trio.Nursery) -> None:
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    shim.start(container, container.init, INIT_PID)
    process = shim.start_exec(container, "e1", EXEC_PID)
    assert not container.execs_idle.is_set()
    shim.exits.on_exit(Exit(EXEC_PID, 7, 1))
    await settle()
    assert shim.events.exits() == [("e1", EXEC_PID, 7)]
    assert shim.events.published[0][1].container_id == "c1"
    assert (process.status, process.exit_status) == (Status.STOPPED, 7)
    assert container.execs_idle.is_set()  # the exec no longer holds the init's exit
    assert container.init.status == Status.RUNNING
    assert bundlefiles.read_exit(container.bundle) is None  # only the init's exit is kept
    shim.exits.on_exit(Exit(INIT_PID, 0, 2))
    await settle()
    assert shim.events.exits() == [("e1", EXEC_PID, 7), ("c1", INIT_PID, 0)]
    assert bundlefiles.read_exit(container.bundle) == bundlefiles.ExitRecord(INIT_PID, 0, 2)


async def test_the_init_exit_is_published_after_its_execs_exits(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    shim.start(container, container.init, INIT_PID)
    child = subprocess.Popen(["sleep", "60"])  # the exec: still running at the init's exit
    try:
        shim.start_exec(container, "e1", child.pid)
        shim.exits.on_exit(Exit(INIT_PID, 137, 1))
        await settle()
        assert container.init.reaped and not container.init.exited.is_set()
        assert shim.events.published == []  # the init's exit waits for the exec's
        # The exec dies with the init: when runc did not kill it, the shim does.
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(child.wait) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    shim.exits.on_exit(Exit(child.pid, 137, 2))
    await settle()
    assert shim.events.exits() == [("e1", child.pid, 137), ("c1", INIT_PID, 137)]


async def test_unsubscribe(tmp_path: Path, nursery: trio.Nursery) -> None:
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    dropped = shim.exits.subscribe()
    shim.exits.unsubscribe(dropped)
    kept = shim.exits.subscribe()
    shim.exits.on_exit(Exit(INIT_PID, 1, 1))
    assert kept == {INIT_PID: [Exit(INIT_PID, 1, 1)]}
    assert dropped == {}
    shim.exits.unsubscribe(dropped)  # twice (a failed start after a drop): harmless
    # A failed Create/exec start drops what it held: nothing is handled.
    shim.exits.unsubscribe(kept)
    await settle()
    assert not container.init.reaped
    assert shim.events.published == []


async def test_forget(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Start forgets the init watched since Create (its exit is then held by Start's
    subscriber); Delete forgets it, so the exit `runc delete` causes is not published."""
    shim = Shim(tmp_path, nursery)
    c1, c2 = await shim.container("c1"), await shim.container("c2")
    shim.start(c1, c1.init, INIT_PID)
    shim.start(c2, c2.init, INIT_PID)  # a pid reused: both watched under it
    shim.exits.forget(c1.init)
    shim.exits.on_exit(Exit(INIT_PID, 0, 1))
    await settle()
    assert not c1.init.reaped
    assert [m.container_id for _, m in shim.events.published] == ["c2"]
    shim.exits.forget(c2.init)  # no longer watched: nothing to do
    shim.exits.forget(c1.init)


async def test_one_exit_is_never_handled_twice(tmp_path: Path, nursery: trio.Nursery) -> None:
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    init = container.init
    shim.start(container, init, INIT_PID)
    early = shim.exits.subscribe()
    shim.exits.on_exit(Exit(INIT_PID, 2, 1))  # watched and held by a second start
    shim.exits.started(container, init, early)  # already reaped: not handled again
    shim.start(container, init, INIT_PID)  # nor watched again
    shim.exits.on_exit(Exit(INIT_PID, 2, 1))
    await settle()
    assert shim.events.exits() == [("c1", INIT_PID, 2)]


async def test_watched_once_however_often_started(tmp_path: Path, nursery: trio.Nursery) -> None:
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    shim.start(container, container.init, INIT_PID)
    shim.start(container, container.init, INIT_PID)
    shim.exits.on_exit(Exit(INIT_PID, 0, 1))
    await settle()
    assert shim.events.exits() == [("c1", INIT_PID, 0)]


async def test_a_process_with_no_pid_is_not_watched(tmp_path: Path, nursery: trio.Nursery) -> None:
    """A Create from a checkpoint has no pid until Start restores it."""
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    shim.exits.started(container, container.init, shim.exits.subscribe())
    shim.exits.on_exit(Exit(0, 0, 1))  # never a real pid; nothing is watched under it
    await settle()
    assert not container.init.reaped


async def test_an_exit_after_the_container_closed_is_still_handled(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Its nursery is gone: the exit is handled in the matcher's own."""
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    shim.start(container, container.init, INIT_PID)
    container.close()
    await settle()
    assert container.background() is None
    shim.exits.on_exit(Exit(INIT_PID, 9, 1))
    await settle()
    assert shim.events.exits() == [("c1", INIT_PID, 9)]


async def test_unsubscribe_drops_that_subscriber_not_an_equal_one(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Two starts at once hold the same exits (none yet): when one fails and
    unsubscribes, the other still gets the exit that races it."""
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    starting, failing = shim.exits.subscribe(), shim.exits.subscribe()
    assert starting == failing  # equal, not the same
    shim.exits.unsubscribe(failing)
    shim.exits.on_exit(Exit(INIT_PID, 4, 1))  # the first one's process, during its start
    assert failing == {}
    container.init.set_running(INIT_PID)
    shim.exits.started(container, container.init, starting)
    await settle()
    assert shim.events.exits() == [("c1", INIT_PID, 4)]


class PendingOutput:
    """The stdio of a process whose output has not all reached its reader yet."""

    def __init__(self) -> None:
        self.output_done = trio.Event()
        self.exited = False

    def process_exited(self) -> None:
        self.exited = True

    async def wait_output(self, idle: float) -> bool:
        await self.output_done.wait()
        return True


async def test_an_exec_exit_with_nothing_left_to_wait_for_is_recorded_at_once(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """No task, no pass of the scheduler: Wait and State see it as the reaper does."""
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    shim.start(container, container.init, INIT_PID)
    process = shim.start_exec(container, "e1", EXEC_PID)
    shim.exits.on_exit(Exit(EXEC_PID, 4, 1))
    assert process.exited.is_set() and process.exit_status == 4  # before any await
    assert shim.events.exits() == [("e1", EXEC_PID, 4)]
    assert container.execs_idle.is_set()


async def test_an_early_exec_exit_is_recorded_by_the_start(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A short exec gone before `runc exec` returned: Start's answer already finds
    it exited (Wait answers right after it), and the exit follows exec-started."""
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    shim.start(container, container.init, INIT_PID)
    process = container.add_exec("e1", StdioSpec(), b"{}")
    container.exec_started()
    subscriber = shim.exits.subscribe()
    shim.exits.on_exit(Exit(EXEC_PID, 0, 1))  # during `runc exec`
    process.set_running(EXEC_PID)
    shim.events.publish("/tasks/exec-started", None)
    shim.exits.started(container, process, subscriber)
    assert process.exited.is_set()
    assert shim.events.topics() == ["/tasks/exec-started", "/tasks/exit"]


async def test_an_exec_exit_waits_in_the_background_for_its_output(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    shim = Shim(tmp_path, nursery)
    container = await shim.container()
    shim.start(container, container.init, INIT_PID)
    process = shim.start_exec(container, "e1", EXEC_PID)
    io = PendingOutput()
    process.io = cast(Any, io)
    shim.exits.on_exit(Exit(EXEC_PID, 0, 1))
    await settle()
    assert io.exited and process.reaped
    assert not process.exited.is_set() and shim.events.published == []
    io.output_done.set()
    await settle()
    assert process.exited.is_set()
    assert shim.events.exits() == [("e1", EXEC_PID, 0)]
