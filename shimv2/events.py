"""Task events to containerd: ``Events.Forward`` on ``TTRPC_ADDRESS`` (spec: events.md,
shim-contract.md §9).

One ordered queue: ``publish`` only appends (it never blocks an RPC); one task
delivers the head, retrying with capped back-off while containerd is away, so
events arrive in order and are not dropped. The envelope keeps the time of the
event itself. Only an event containerd rejects as invalid is discarded.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import trio
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from shimv2.api.containerd.services.events.ttrpc.v1 import events_pb2
from shimv2.ttrpc import Code, TTRPCError, connect

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
FORWARD_TIMEOUT = 5.0
FIRST_RETRY = 0.05
MAX_RETRY = 2.0
MAX_REFUSALS = 10  # answered errors (not an unreachable containerd) for one event


def pack(message: Message) -> any_pb2.Any:
    """An Any with containerd's bare type URL (Any.Pack would add a prefix 1.6 rejects)."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self._address = address.removeprefix("unix://")
        self._namespace = namespace
        self._queue: collections.deque[events_pb2.Envelope] = collections.deque()
        self._head_failures = 0
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    def publish(self, topic: str, event: Message) -> None:
        envelope = events_pb2.Envelope(namespace=self._namespace, topic=topic, event=pack(event))
        envelope.timestamp.FromNanoseconds(time.time_ns())
        self._queue.append(envelope)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event is delivered; False on timeout."""
        with trio.move_on_after(timeout):
            await self._idle.wait()
        return not self._queue

    async def run(self) -> None:
        delay = FIRST_RETRY
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            if not self._address:
                log.warning("no TTRPC_ADDRESS: dropping %d events", len(self._queue))
                self._queue.clear()
                continue
            try:
                async with connect(self._address) as client:
                    delay = FIRST_RETRY
                    await self._deliver(client)
            except (OSError, TTRPCError) as exc:
                log.info("events: containerd unreachable (%s); retrying in %.2fs", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY)

    async def _deliver(self, client: Any) -> None:
        """Send queued events in order over one connection until the queue is empty."""
        while self._queue:
            envelope = self._queue[0]
            try:
                await client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    events_pb2.ForwardRequest(envelope=envelope),
                    empty_pb2.Empty,
                    timeout=FORWARD_TIMEOUT,
                    metadata=[(NAMESPACE_KEY, self._namespace)],
                )
            except TTRPCError as exc:
                self._head_failures += 1
                # Rejected as invalid, or refused again and again while containerd
                # is up: this event will never go through; do not block the others.
                if exc.code == Code.INVALID_ARGUMENT or self._head_failures >= MAX_REFUSALS:
                    log.error("containerd refused event %s, dropping it: %s", envelope.topic, exc)
                    self._pop()
                    continue
                raise
            self._pop()

    def _pop(self) -> None:
        self._queue.popleft()
        self._head_failures = 0
