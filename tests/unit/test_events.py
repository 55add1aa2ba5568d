"""The event publisher against a real in-process ttrpc server (spec: events.md,
shim-contract.md §9): a fake ``containerd.services.events.ttrpc.v1.Events/Forward``.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from google.protobuf import empty_pb2

from shimv2 import events as events_mod
from shimv2.api.containerd.events import task_pb2 as events
from shimv2.api.containerd.services.events.ttrpc.v1 import events_pb2
from shimv2.events import EVENTS_SERVICE, NAMESPACE_KEY, Publisher, pack
from shimv2.ttrpc import Code, Method, RequestContext, Server, TTRPCError

TIMEOUT = 10


class FakeContainerd:
    """Records every Forward; can reject or fail chosen topics."""

    def __init__(self) -> None:
        self.received: list[tuple[events_pb2.Envelope, int, dict[str, list[str]]]] = []
        self.reject_topics: set[str] = set()  # INVALID_ARGUMENT, like a bad envelope
        self.fail_once: set[str] = set()  # UNAVAILABLE once, then accept
        self.attempts: dict[str, int] = {}
        self.connections: list[trio.Event] = []  # one `disconnected` event per connection
        self.changed = trio.Event()

    async def forward(self, req: events_pb2.ForwardRequest, ctx: RequestContext) -> empty_pb2.Empty:
        topic = req.envelope.topic
        self.attempts[topic] = self.attempts.get(topic, 0) + 1
        if not any(c is ctx.disconnected for c in self.connections):
            self.connections.append(ctx.disconnected)
        if topic in self.reject_topics:
            raise TTRPCError(Code.INVALID_ARGUMENT, "topic rejected")
        if topic in self.fail_once:
            self.fail_once.discard(topic)
            raise TTRPCError(Code.UNAVAILABLE, "try again")
        self.received.append((req.envelope, time.time_ns(), ctx.metadata))
        self.changed.set()
        self.changed = trio.Event()
        return empty_pb2.Empty()

    def topics(self) -> list[str]:
        return [env.topic for env, _, _ in self.received]

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(TIMEOUT):
            while len(self.received) < count:
                await self.changed.wait()


@asynccontextmanager
async def serving(path: str, fake: FakeContainerd) -> AsyncIterator[None]:
    server = Server()
    server.register_service(
        EVENTS_SERVICE, {"Forward": Method(events_pb2.ForwardRequest, fake.forward)}
    )
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, sock)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()
            sock.close()


@pytest.fixture
def address(tmp_path: Path) -> str:
    return str(tmp_path / "c.sock.ttrpc")


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_mod, "FIRST_RETRY", 0.01)
    monkeypatch.setattr(events_mod, "MAX_RETRY", 0.1)


def exit_event(i: int) -> events.TaskExit:
    return events.TaskExit(container_id=f"c{i}", id=f"c{i}", pid=100 + i, exit_status=i)


def test_pack_uses_bare_type_urls() -> None:
    packed = pack(events.TaskExit(container_id="c1"))
    assert packed.type_url == "containerd.events.TaskExit"
    assert events.TaskExit.FromString(packed.value).container_id == "c1"


async def test_delivery_fields(address: str) -> None:
    fake = FakeContainerd()
    publisher = Publisher("unix://" + address, "k8s.io")  # the unix:// prefix is accepted
    async with serving(address, fake), trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        before = time.time_ns()
        publisher.publish("/tasks/exit", exit_event(3))
        after = time.time_ns()
        await fake.wait_for(1)
        nursery.cancel_scope.cancel()
    [(envelope, _, metadata)] = fake.received
    assert envelope.topic == "/tasks/exit"
    assert envelope.namespace == "k8s.io"
    assert envelope.event.type_url == "containerd.events.TaskExit"  # no googleapis prefix
    assert events.TaskExit.FromString(envelope.event.value) == exit_event(3)
    assert envelope.HasField("timestamp")
    assert before <= envelope.timestamp.ToNanoseconds() <= after
    assert metadata[NAMESPACE_KEY] == ["k8s.io"]


@pytest.mark.parametrize(
    ("topic", "event", "type_url"),
    [
        ("/tasks/create", events.TaskCreate(container_id="c"), "containerd.events.TaskCreate"),
        ("/tasks/start", events.TaskStart(container_id="c"), "containerd.events.TaskStart"),
        ("/tasks/delete", events.TaskDelete(container_id="c"), "containerd.events.TaskDelete"),
        (
            "/tasks/exec-added",
            events.TaskExecAdded(container_id="c"),
            "containerd.events.TaskExecAdded",
        ),
        (
            "/tasks/exec-started",
            events.TaskExecStarted(container_id="c"),
            "containerd.events.TaskExecStarted",
        ),
        ("/tasks/oom", events.TaskOOM(container_id="c"), "containerd.events.TaskOOM"),
        ("/tasks/paused", events.TaskPaused(container_id="c"), "containerd.events.TaskPaused"),
    ],
)
async def test_bare_type_urls_for_every_event(
    address: str, topic: str, event: object, type_url: str
) -> None:
    fake = FakeContainerd()
    publisher = Publisher(address, "default")
    async with serving(address, fake), trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        publisher.publish(topic, event)  # type: ignore[arg-type]
        await fake.wait_for(1)
        nursery.cancel_scope.cancel()
    assert fake.received[0][0].event.type_url == type_url


async def test_order_is_preserved(address: str) -> None:
    fake = FakeContainerd()
    publisher = Publisher(address, "default")
    async with serving(address, fake), trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        for i in range(100):
            publisher.publish(f"/tasks/t{i}", exit_event(i))
            if i % 7 == 0:
                await trio.sleep(0)
        await fake.wait_for(100)
        nursery.cancel_scope.cancel()
    assert fake.topics() == [f"/tasks/t{i}" for i in range(100)]


async def test_retries_while_containerd_is_down_in_order_without_duplicates(
    address: str, fast_retry: None
) -> None:
    fake = FakeContainerd()
    publisher = Publisher(address, "default")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        published_at = []
        for i in range(20):
            published_at.append(time.time_ns())
            publisher.publish(f"/tasks/t{i}", exit_event(i))
        await trio.sleep(0.3)  # several failed attempts: nobody listens yet
        assert publisher.pending == 20
        assert not await publisher.flush(0.05)
        async with serving(address, fake):
            await fake.wait_for(20)
            with trio.fail_after(TIMEOUT):
                assert await publisher.flush(TIMEOUT)
            await trio.sleep(0.1)  # nothing more arrives (no duplicates)
        nursery.cancel_scope.cancel()
    assert fake.topics() == [f"/tasks/t{i}" for i in range(20)]
    for i, (envelope, delivered_at, _) in enumerate(fake.received):
        stamp = envelope.timestamp.ToNanoseconds()
        # The envelope keeps the time of the event, not of its delivery.
        assert published_at[i] <= stamp <= published_at[i] + 50_000_000
        assert delivered_at - stamp >= 250_000_000


async def test_containerd_restart_between_events(address: str, fast_retry: None) -> None:
    fake = FakeContainerd()
    publisher = Publisher(address, "default")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        async with serving(address, fake):
            publisher.publish("/tasks/a", exit_event(1))
            with trio.fail_after(TIMEOUT):
                # acknowledged: (a reply lost with a dying containerd means a
                # redelivery, which consumers must tolerate; not tested here)
                assert await publisher.flush(TIMEOUT)
        # containerd is gone (its socket file stays, nobody accepts)
        publisher.publish("/tasks/b", exit_event(2))
        publisher.publish("/tasks/c", exit_event(3))
        await trio.sleep(0.2)
        Path(address).unlink()
        async with serving(address, fake):
            await fake.wait_for(3)
        nursery.cancel_scope.cancel()
    assert fake.topics() == ["/tasks/a", "/tasks/b", "/tasks/c"]


async def test_one_connection_serves_bursts_and_a_dead_one_is_replaced_at_once(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_mod, "FIRST_RETRY", 5.0)  # a back-off would time the test out
    fake = FakeContainerd()
    publisher = Publisher(address, "default")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        async with serving(address, fake):
            for i in range(3):  # three bursts with quiet in between: one connection
                publisher.publish(f"/tasks/{i}", exit_event(i))
                await fake.wait_for(i + 1)
                await trio.sleep(0.05)
            assert len(fake.connections) == 1
        Path(address).unlink()  # containerd restarts: the kept connection is dead
        async with serving(address, fake):
            publisher.publish("/tasks/after", exit_event(9))
            with trio.fail_after(2.0):
                await fake.wait_for(4)
        nursery.cancel_scope.cancel()
    assert fake.topics() == ["/tasks/0", "/tasks/1", "/tasks/2", "/tasks/after"]
    assert len(fake.connections) == 2


async def test_invalid_argument_drops_only_that_event(address: str) -> None:
    fake = FakeContainerd()
    fake.reject_topics.add("/tasks/bad")
    publisher = Publisher(address, "default")
    async with serving(address, fake), trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        publisher.publish("/tasks/one", exit_event(1))
        publisher.publish("/tasks/bad", exit_event(2))
        publisher.publish("/tasks/two", exit_event(3))
        with trio.fail_after(TIMEOUT):
            assert await publisher.flush(TIMEOUT)
        nursery.cancel_scope.cancel()
    assert fake.topics() == ["/tasks/one", "/tasks/two"]
    assert fake.attempts["/tasks/bad"] == 1
    assert publisher.pending == 0


async def test_other_errors_are_retried_in_order(address: str, fast_retry: None) -> None:
    fake = FakeContainerd()
    fake.fail_once.add("/tasks/flaky")
    publisher = Publisher(address, "default")
    async with serving(address, fake), trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        publisher.publish("/tasks/flaky", exit_event(1))
        publisher.publish("/tasks/after", exit_event(2))
        with trio.fail_after(TIMEOUT):
            assert await publisher.flush(TIMEOUT)
        nursery.cancel_scope.cancel()
    assert fake.topics() == ["/tasks/flaky", "/tasks/after"]
    assert fake.attempts == {"/tasks/flaky": 2, "/tasks/after": 1}


async def test_publish_never_blocks(address: str) -> None:
    publisher = Publisher(address, "default")  # not even running
    with trio.fail_after(1):
        for i in range(10_000):
            publisher.publish("/tasks/x", exit_event(i))
    assert publisher.pending == 10_000


async def test_flush_with_nothing_queued_is_immediate() -> None:
    publisher = Publisher("/nonexistent.sock", "default")
    with trio.fail_after(1):
        assert await publisher.flush(5)


async def test_flush_times_out_while_containerd_is_down(address: str, fast_retry: None) -> None:
    publisher = Publisher(address, "default")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        publisher.publish("/tasks/x", exit_event(1))
        began = trio.current_time()
        assert not await publisher.flush(0.2)
        assert trio.current_time() - began >= 0.2
        assert publisher.pending == 1
        nursery.cancel_scope.cancel()


async def test_flush_waits_for_delivery(address: str) -> None:
    fake = FakeContainerd()
    publisher = Publisher(address, "default")
    async with serving(address, fake), trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        for i in range(10):
            publisher.publish(f"/tasks/t{i}", exit_event(i))
        with trio.fail_after(TIMEOUT):
            assert await publisher.flush(TIMEOUT)
        assert len(fake.received) == 10
        # A second batch after the queue went idle once.
        publisher.publish("/tasks/late", exit_event(99))
        with trio.fail_after(TIMEOUT):
            assert await publisher.flush(TIMEOUT)
        assert fake.topics()[-1] == "/tasks/late"
        nursery.cancel_scope.cancel()


async def test_without_address_events_are_dropped() -> None:
    publisher = Publisher("", "default")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        publisher.publish("/tasks/x", exit_event(1))
        with trio.fail_after(TIMEOUT):
            assert await publisher.flush(TIMEOUT)
        assert publisher.pending == 0
        nursery.cancel_scope.cancel()


# -- the on-disk journal (shimv2/journal.py) ---------------------------------------------


def journal_topics(bundle: Path) -> list[tuple[str, str]]:
    """(topic, container id) of every record in a bundle's journal, in file order."""
    from shimv2.journal import read

    _, records = read(str(bundle / "events.journal"))
    out = []
    for record in records:
        envelope = events_pb2.Envelope.FromString(record.payload)
        out.append((envelope.topic, events.TaskExit.FromString(envelope.event.value).container_id))
    return out


def bundles(tmp_path: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        (tmp_path / name).mkdir()
        out.append(tmp_path / name)
    return out


async def test_each_container_journals_its_own_events_in_order(
    address: str, tmp_path: Path, fast_retry: None
) -> None:
    b1, b2 = bundles(tmp_path, "b1", "b2")
    fake = FakeContainerd()
    publisher = Publisher(address, "default")
    publisher.open_journal("c1", str(b1))
    publisher.open_journal("c2", str(b2))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        for i in range(6):  # containerd is down: everything waits
            publisher.publish(f"/tasks/t{i}", exit_event(1 + i % 2))
        publisher.publish("/tasks/other", exit_event(3))  # no journal: memory only
        await trio.sleep(0.05)
        assert journal_topics(b1) == [("/tasks/t0", "c1"), ("/tasks/t2", "c1"), ("/tasks/t4", "c1")]
        assert journal_topics(b2) == [("/tasks/t1", "c2"), ("/tasks/t3", "c2"), ("/tasks/t5", "c2")]
        async with serving(address, fake):
            with trio.fail_after(TIMEOUT):
                assert await publisher.flush(TIMEOUT)
        nursery.cancel_scope.cancel()
    assert fake.topics() == [f"/tasks/t{i}" for i in range(6)] + ["/tasks/other"]
    assert journal_topics(b1) == journal_topics(b2) == []  # delivered: cut back


async def test_a_new_daemon_replays_undelivered_events_first_and_once(
    address: str, tmp_path: Path, fast_retry: None
) -> None:
    [bundle] = bundles(tmp_path, "b1")
    dead = Publisher(address, "default")  # never reaches containerd, then dies
    dead.open_journal("c1", str(bundle))
    stamps = []
    for i in range(3):
        dead.publish(f"/tasks/old{i}", exit_event(1))
        stamps.append(dead._queue[-1].envelope.timestamp.ToNanoseconds())  # type: ignore[union-attr]
    fake = FakeContainerd()
    for _ in range(2):  # the second daemon in the same bundle finds nothing left to send
        publisher = Publisher(address, "default")
        publisher.replay("c1", str(bundle))
        async with serving(address, fake), trio.open_nursery() as nursery:
            nursery.start_soon(publisher.run)
            publisher.publish("/tasks/new", exit_event(1))
            with trio.fail_after(TIMEOUT):
                assert await publisher.flush(TIMEOUT)
            nursery.cancel_scope.cancel()
        Path(address).unlink()
    assert fake.topics() == [
        "/tasks/old0",
        "/tasks/old1",
        "/tasks/old2",
        "/tasks/new",
        "/tasks/new",
    ]
    # Replayed envelopes keep the time of the event.
    assert [env.timestamp.ToNanoseconds() for env, _, _ in fake.received[:3]] == stamps


async def test_replay_without_a_journal_creates_nothing(tmp_path: Path) -> None:
    publisher = Publisher("/nonexistent.sock", "default")
    publisher.replay("c1", str(tmp_path))
    assert os.listdir(tmp_path) == []


async def test_released_journal_stays_until_the_delete_event_is_delivered(
    address: str, tmp_path: Path, fast_retry: None
) -> None:
    [bundle] = bundles(tmp_path, "b1")
    journal = bundle / "events.journal"
    fake = FakeContainerd()
    publisher = Publisher(address, "default")
    publisher.open_journal("c1", str(bundle))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        publisher.publish("/tasks/exit", exit_event(1))
        publisher.publish("/tasks/delete", events.TaskDelete(container_id="c1"))
        publisher.release_journal("c1")  # the init was deleted while containerd is away
        publisher.publish("/tasks/late", exit_event(1))  # not journaled any more
        await trio.sleep(0.1)
        assert [t for t, _ in journal_topics(bundle)] == ["/tasks/exit", "/tasks/delete"]
        async with serving(address, fake):
            with trio.fail_after(TIMEOUT):
                assert await publisher.flush(TIMEOUT)
        nursery.cancel_scope.cancel()
    assert fake.topics() == ["/tasks/exit", "/tasks/delete", "/tasks/late"]
    assert not journal.exists()


async def test_close_journals_keeps_only_undelivered_events(tmp_path: Path) -> None:
    b1, b2 = bundles(tmp_path, "b1", "b2")
    publisher = Publisher("/nonexistent.sock", "default")
    publisher.open_journal("c1", str(b1))
    publisher.open_journal("c2", str(b2))
    publisher.publish("/tasks/exit", exit_event(1))  # c1: undelivered at exit
    publisher.close_journals()
    assert journal_topics(b1) == [("/tasks/exit", "c1")]
    assert os.listdir(b2) == []


async def test_full_disk_publishing_and_delivery_go_on(
    address: str,
    tmp_path: Path,
    fast_retry: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    [bundle] = bundles(tmp_path, "b1")
    fake = FakeContainerd()
    publisher = Publisher(address, "default")
    publisher.open_journal("c1", str(bundle))

    def no_space(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)
    async with serving(address, fake), trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        with trio.fail_after(1):
            for i in range(5):
                publisher.publish("/tasks/exit", exit_event(1))
                publisher.publish(f"/tasks/t{i}", exit_event(1))
        with trio.fail_after(TIMEOUT):
            assert await publisher.flush(TIMEOUT)
        nursery.cancel_scope.cancel()
    assert fake.topics() == [t for i in range(5) for t in ("/tasks/exit", f"/tasks/t{i}")]
    persist_errors = [r for r in caplog.records if "could not persist event" in r.getMessage()]
    assert [r.getMessage() for r in persist_errors] == [
        f"could not persist event /tasks/exit for c1 in {bundle}/events.journal:"
        " No space left on device; kept in memory"
    ]
