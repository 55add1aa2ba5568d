"""An ordered on-disk journal of a container's unsent task events (issue 5).

**Where.** One file per container, ``<bundle>/events.journal``, in the bundle
that Create named. In a grouped shim every container's events go to its own
bundle, so a journal lives exactly as long as its container's bundle, and
deleting one container never touches another's events (the shim's cwd is only
the first container's bundle and may go first). The publisher's in-memory queue
stays the source of truth for delivery order across containers; each journal
mirrors the part of that queue that belongs to its container, in the same order.

**Format.** A 16-byte header, ``PYSHIMJ1`` + little-endian u64 ``delivered``
(every record with seq <= delivered has reached containerd), then records
``<u32 length><u32 crc32><u64 seq><serialized Envelope>``, the crc over seq and
payload. An event is one ``pwrite`` at the end; a delivery rewrites the 8
header bytes in place, so delivering never makes the file grow. When nothing is
pending the file is cut back to its header, and a file mostly made of delivered
records is compacted (rewritten through a temporary file and a rename). A
record cut short or garbled (a crash in mid-write) ends the journal: it and
anything after it is ignored and cut away when the journal is opened again.

**No fsync.** We survive the death of the shim or of containerd, not a power
loss. A pwrite of a few hundred bytes into the page cache costs microseconds,
so the publisher writes on the event loop.

**Failures** (ENOSPC on a full bundle filesystem, EROFS, EIO): the event stays
in memory and is delivered from there; the first failure of a burst is logged
("could not persist event ... kept in memory"). Until the journal holds every
pending event again, each append rewrites the whole pending part from memory,
so the file never has a hole a replay would skip.

**Replay and removal.** A daemon that starts in a bundle with undelivered
events replays them before anything new (:meth:`Journal.open`). The init's
Delete releases the journal: the file goes once the ``/tasks/delete`` event is
delivered. Undelivered events at shim exit stay on disk, and ``shim delete``
takes the init's exit from here when ``init.exit.json`` could not be written
(:func:`read_init_exit`). Hence no trio or protobuf imports in this module.

A crash between a delivery and its header update re-sends that one event on
replay; containerd's consumers tolerate duplicates (events.md §1), and the
window is a single syscall.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import struct
import zlib
from typing import NamedTuple

from shimv2 import protowire
from shimv2.bundle import ExitRecord

log = logging.getLogger(__name__)

FILE_NAME = "events.journal"
MAGIC = b"PYSHIMJ1"
HEADER = struct.Struct("<8sQ")
RECORD = struct.Struct("<IIQ")
_SEQ = struct.Struct("<Q")
#: A record longer than this is garbage (an event is a few hundred bytes).
MAX_RECORD = 1 << 20
#: Compact when at least this many bytes of delivered records lie in front of the pending ones.
COMPACT_BYTES = 64 << 10


class Record(NamedTuple):
    seq: int
    payload: bytes


def journal_path(bundle: str) -> str:
    return os.path.join(bundle, FILE_NAME)


def encode_record(record: Record) -> bytes:
    seq = _SEQ.pack(record.seq)
    crc = zlib.crc32(record.payload, zlib.crc32(seq))
    return RECORD.pack(len(record.payload), crc, record.seq) + record.payload


def decode(data: bytes) -> tuple[int, list[Record], int]:
    """``(delivered, records, end)`` of a journal's bytes; ``end`` is where the last
    intact record ends (anything after it is a torn or garbled write)."""
    if len(data) < HEADER.size:
        return 0, [], 0
    magic, delivered = HEADER.unpack_from(data)
    if magic != MAGIC:
        return 0, [], 0
    records: list[Record] = []
    pos = HEADER.size
    while pos + RECORD.size <= len(data):
        length, crc, seq = RECORD.unpack_from(data, pos)
        end = pos + RECORD.size + length
        if length > MAX_RECORD or end > len(data):
            break
        payload = data[pos + RECORD.size : end]
        if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
            break
        if records and seq <= records[-1].seq:
            break
        records.append(Record(seq, payload))
        pos = end
    return delivered, records, pos


def read(path: str) -> tuple[int, list[Record]]:
    """``(delivered, records)`` of a journal file; nothing when absent or unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return 0, []
    delivered, records, _ = decode(data)
    return delivered, records


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


class Journal:
    """The journal of one container. Not thread-safe; used from the event loop."""

    def __init__(self, path: str, owner: str) -> None:
        self.path = path
        self.owner = owner  # the container id, for log lines
        self.released = False  # the container was deleted: remove the file once delivered
        self._fd = -1
        self._pending: collections.deque[Record] = collections.deque()
        self._seq = 0  # the last seq handed out
        self._delivered = 0
        self._end = 0  # file offset after the last record written
        self._stale_bytes = 0  # delivered records still in the file
        self._failure: OSError | None = None  # set while the file misses pending events
        self._unpersisted = 0  # events kept in memory only during this failure burst
        self._event_reported = False  # an event of this burst was named in the log

    @classmethod
    def open(cls, path: str, owner: str) -> tuple[Journal, list[Record]]:
        """Open (creating it if needed) the journal at ``path``; also returns the
        undelivered records a previous daemon left, oldest first, for replay."""
        journal = cls(path, owner)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        delivered, records, end = decode(data)
        pending = [r for r in records if r.seq > delivered]
        journal._delivered = delivered
        journal._seq = max([delivered, *(r.seq for r in records)])
        journal._pending.extend(pending)
        if pending:
            log.info("replaying %d undelivered events of %s from %s", len(pending), owner, path)
        if data and end == len(data):
            # Intact: kept as it is (a rewrite would have a window without the events).
            with contextlib.suppress(OSError):
                journal._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                journal._end = end
                journal._stale_bytes = sum(
                    RECORD.size + len(r.payload) for r in records if r.seq <= delivered
                )
                return journal, pending
        # New, or torn/garbled at the end: rewritten from what was read.
        journal._resync(topic="")
        return journal, pending

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def append(self, topic: str, payload: bytes) -> int:
        """Record a new event; returns its seq (pass it to :meth:`delivered`)."""
        self._seq += 1
        record = Record(self._seq, payload)
        self._pending.append(record)
        if self._failure is not None or self._fd < 0:
            self._resync(topic)
            return record.seq
        try:
            _write_all(self._fd, encode_record(record), self._end)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)  # no torn record at the end
            self._failed(exc, topic)
            return record.seq
        self._end += RECORD.size + len(payload)
        return record.seq

    def delivered(self, seq: int) -> None:
        """containerd has every event up to ``seq`` (or refused it for good)."""
        while self._pending and self._pending[0].seq <= seq:
            done = self._pending.popleft()
            self._stale_bytes += RECORD.size + len(done.payload)
        self._delivered = max(self._delivered, seq)
        if not self._pending:
            if self.released:
                self.remove()
            else:
                self._resync(topic="")  # cut back to the header (and heal a failure)
            return
        if self._fd < 0 or self._failure is not None:
            self._resync(topic="")  # try to heal: the file may miss events or marks
            return
        if self._stale_bytes >= COMPACT_BYTES and not self.released:
            self.compact()
            return
        try:
            _write_all(self._fd, _SEQ.pack(self._delivered), len(MAGIC))
        except OSError as exc:
            self._failed(exc, topic="")

    def compact(self) -> None:
        """Rewrite the file with only the pending records, atomically (rename); a
        failure leaves the old, still correct file in place."""
        tmp = os.path.join(os.path.dirname(self.path), "." + os.path.basename(self.path) + ".tmp")
        fd = -1
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            end = self._write_from_header(fd)
            os.rename(tmp, self.path)
        except OSError as exc:
            log.warning("could not compact the event journal of %s: %s", self.owner, exc)
            if fd >= 0:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return
        os.close(self._fd)
        self._fd, self._end, self._stale_bytes = fd, end, 0

    def remove(self) -> None:
        """Close and delete the file (only if it is still ours: a new container
        with the same id may have a new bundle at the same path)."""
        if self._fd < 0:
            return
        try:
            ours = os.fstat(self._fd)
            there = os.stat(self.path)
            if (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(self.path)
        except OSError:
            pass  # the bundle is already gone
        os.close(self._fd)
        self._fd = -1
        log.debug("every event of %s delivered: removed its journal %s", self.owner, self.path)

    def close(self) -> None:
        """At shim exit: delete the file when everything was delivered, else keep it."""
        if not self._pending:
            self.remove()
            return
        log.warning(
            "%d undelivered events of %s stay in %s", len(self._pending), self.owner, self.path
        )
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- internals --------------------------------------------------------------

    def _write_from_header(self, fd: int) -> int:
        """Write header + pending records into ``fd`` from offset 0; returns the end."""
        data = HEADER.pack(MAGIC, self._delivered) + b"".join(
            encode_record(r) for r in self._pending
        )
        _write_all(fd, data, 0)
        os.ftruncate(fd, len(data))
        return len(data)

    def _resync(self, topic: str) -> None:
        """Make the file hold exactly the pending records, rewritten in place (a full
        disk has no room for a second copy; the pages it has are reused). Clears a
        failure when it works."""
        try:
            if self._fd < 0:
                if self.released:
                    return
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._end = self._write_from_header(self._fd)
        except OSError as exc:
            # Whatever the file holds now ends at an intact record or a torn one that
            # readers ignore; the next append or delivery tries again.
            self._failed(exc, topic)
            return
        self._stale_bytes = 0
        if self._failure is not None:
            log.warning(
                "events of %s are persisted in %s again (%d were kept in memory only)",
                self.owner,
                self.path,
                self._unpersisted,
            )
            self._failure, self._unpersisted, self._event_reported = None, 0, False

    def _failed(self, exc: OSError, topic: str) -> None:
        """Log once per burst: the first event not persisted (and, if the burst began
        with a delivery mark or the file itself, that too)."""
        reason = exc.strerror or str(exc)
        if topic:
            self._unpersisted += 1
            if not self._event_reported:
                self._event_reported = True
                log.error(
                    "could not persist event %s for %s in %s: %s; kept in memory",
                    topic,
                    self.owner,
                    self.path,
                    reason,
                )
        elif self._failure is None:
            log.error(
                "could not persist the event journal for %s in %s: %s; events kept in memory",
                self.owner,
                self.path,
                reason,
            )
        self._failure = exc


# -- shim delete: the init's exit after a dead shim ------------------------------------

EXIT_TOPIC = "/tasks/exit"
EXIT_TYPE = "containerd.events.TaskExit"


def exit_from_envelope(payload: bytes, container_id: str) -> ExitRecord | None:
    """The init's exit in a serialized ``Envelope`` (topic=3, event=4 an Any with
    type_url=1, value=2) holding a ``TaskExit`` (container_id=1, id=2, pid=3,
    exit_status=4, exited_at=5 {seconds=1, nanos=2}); None for anything else."""
    try:
        envelope = protowire.fields(payload)
        if protowire.last_string(envelope, 3) != EXIT_TOPIC:
            return None
        event = protowire.fields(protowire.last_bytes(envelope, 4))
        if protowire.type_name(protowire.last_string(event, 1)) != EXIT_TYPE:
            return None
        exit_ = protowire.fields(protowire.last_bytes(event, 2))
        if protowire.last_string(exit_, 1) != container_id:
            return None
        if protowire.last_string(exit_, 2) != container_id:
            return None  # an exec's exit
        at = protowire.fields(protowire.last_bytes(exit_, 5))
    except protowire.WireError:
        return None

    def number(msg: dict[int, list[int | bytes]], field: int) -> int:
        values = [v for v in msg.get(field, []) if isinstance(v, int)]
        return values[-1] if values else 0

    exited_at_ns = protowire.signed32(number(at, 1)) * 1_000_000_000 + number(at, 2)
    return ExitRecord(number(exit_, 3), number(exit_, 4) & 0xFFFFFFFF, exited_at_ns)


def read_init_exit(bundle: str, container_id: str) -> ExitRecord | None:
    """The last init exit the bundle's journal holds, delivered or not."""
    _, records = read(journal_path(bundle))
    for record in reversed(records):
        found = exit_from_envelope(record.payload, container_id)
        if found is not None:
            return found
    return None
