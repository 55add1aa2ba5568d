"""The event publisher against a real in-process ttrpc server (spec: events.md,
shim-contract.md §9): a fake ``containerd.services.events.ttrpc.v1.Events/Forward``.
"""

from __future__ import annotations

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
        self.changed = trio.Event()

    async def forward(self, req: events_pb2.ForwardRequest, ctx: RequestContext) -> empty_pb2.Empty:
        topic = req.envelope.topic
        self.attempts[topic] = self.attempts.get(topic, 0) + 1
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
