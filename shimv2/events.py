"""Task events to containerd: ``Events.Forward`` on ``TTRPC_ADDRESS`` (spec: events.md,
shim-contract.md §9).

One ordered queue: ``publish`` only appends (it never blocks an RPC); one task
delivers the head, retrying with capped back-off while containerd is away, so
events arrive in order and are not dropped. The envelope keeps the time of the
event itself. Only an event containerd rejects as invalid is discarded.

The queue in memory is the source of truth; each container's share of it is
mirrored into its bundle's journal (:mod:`shimv2.journal`) so that undelivered
events outlive the daemon. An event goes to the journal of the container named
in its ``container_id`` (every task event has one) once the service opened a
journal for it; a delivered event is marked delivered there.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import trio
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import DecodeError, Message

from shimv2.api.containerd.services.events.ttrpc.v1 import events_pb2
from shimv2.journal import Journal, journal_path
from shimv2.ttrpc import Code, TTRPCError, connect

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
FORWARD_TIMEOUT = 5.0
FIRST_RETRY = 0.05
MAX_RETRY = 2.0
KEEP_OPEN = 10.0  # seconds an idle connection to containerd is kept
MAX_REFUSALS = 10  # answered errors (not an unreachable containerd) for one event


def pack(message: Message) -> any_pb2.Any:
    """An Any with containerd's bare type URL (Any.Pack would add a prefix 1.6 rejects)."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


class _Queued(NamedTuple):
    envelope: events_pb2.Envelope | None  # None: an unreadable replayed record, skipped
    journal: Journal | None
    seq: int  # in the journal


@dataclass
class EventCounts:
    """Totals since the daemon started (the debug view and the metrics read them)."""

    published: int = 0
    journaled: int = 0
    retried: int = 0  # failed delivery attempts
    dropped: int = 0  # events given up on: refused, unreadable, or no containerd address


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self._address = address.removeprefix("unix://")
        self._namespace = namespace
        self._queue: collections.deque[_Queued] = collections.deque()
        self._journals: dict[str, Journal] = {}  # container id -> its journal
        self._head_failures = 0
        self._stale = False  # the kept connection sat idle: it may be dead
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self.counts = EventCounts()

    def publish(self, topic: str, event: Message) -> None:
        envelope = events_pb2.Envelope(namespace=self._namespace, topic=topic, event=pack(event))
        envelope.timestamp.FromNanoseconds(time.time_ns())
        journal = self._journals.get(getattr(event, "container_id", ""))
        seq = journal.append(topic, envelope.SerializeToString()) if journal else 0
        self.counts.published += 1
        self.counts.journaled += journal is not None
        self._enqueue(_Queued(envelope, journal, seq))

    def _enqueue(self, item: _Queued) -> None:
        self._queue.append(item)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    # -- journals ---------------------------------------------------------------

    def open_journal(self, container_id: str, bundle: str) -> None:
        """Persist ``container_id``'s events in ``bundle`` from now on; events an
        earlier daemon left undelivered there are queued first (replay)."""
        path = os.path.normpath(journal_path(bundle))
        current = self._journals.get(container_id)
        if current is not None:
            if current.path == path:
                return
            self.release_journal(container_id)
        journal, undelivered = Journal.open(path, container_id)
        self._journals[container_id] = journal
        for record in undelivered:
            envelope: events_pb2.Envelope | None
            try:
                envelope = events_pb2.Envelope.FromString(record.payload)
            except DecodeError:
                log.error("unreadable event in %s, skipping it", path)
                envelope = None  # still queued: the journal marks deliveries in order
            self._enqueue(_Queued(envelope, journal, record.seq))

    def replay(self, container_id: str, bundle: str) -> None:
        """At start-up: take over a journal left in ``bundle``, if there is one."""
        if os.path.exists(journal_path(bundle)):
            self.open_journal(container_id, bundle)

    def release_journal(self, container_id: str) -> None:
        """The task is deleted: its journal goes once its last event is delivered."""
        journal = self._journals.pop(container_id, None)
        if journal is None:
            return
        journal.released = True
        if not journal.pending:
            journal.remove()

    def close_journals(self) -> None:
        """At exit: remove fully delivered journals; undelivered events stay on disk."""
        for journal in self._journals.values():
            journal.close()
        self._journals.clear()

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
                while self._queue:
                    self._pop(dropped=True)
                continue
            try:
                async with connect(self._address) as client:
                    delay = FIRST_RETRY
                    await self._deliver(client)
            except (OSError, TTRPCError) as exc:
                self.counts.retried += 1
                if self._stale:
                    # The kept connection died while quiet (containerd restarted):
                    # a new one, at once, before any back-off.
                    self._stale = False
                    continue
                log.info("events: containerd unreachable (%s); retrying in %.2fs", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY)

    async def _deliver(self, client: Any) -> None:
        """Send queued events in order over one connection, and keep it open while
        events keep coming (a new connection per exit would cost its latency)."""
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup = trio.Event()
                with trio.move_on_after(KEEP_OPEN):
                    await self._wakeup.wait()
                if not self._queue:
                    return
                self._stale = True  # until a call on it succeeds again
            envelope = self._queue[0].envelope
            if envelope is None:
                self._pop(dropped=True)
                continue
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
                    self._pop(dropped=True)
                    continue
                raise
            self._stale = False
            self._pop()

    def snapshot(self) -> dict[str, Any]:
        """What is queued and journaled, for the debug view."""
        return {
            "queued": [item.envelope.topic if item.envelope else "?" for item in self._queue],
            "journals": {
                cid: {"path": j.path, "pending": j.pending, "failed": j.failed}
                for cid, j in self._journals.items()
            },
            "counts": asdict(self.counts),
        }

    def _pop(self, dropped: bool = False) -> None:
        self.counts.dropped += dropped
        item = self._queue.popleft()
        self._head_failures = 0
        if item.journal is not None:
            item.journal.delivered(item.seq)
