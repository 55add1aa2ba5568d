"""Sans-I/O ttrpc framing: bytes in, events out; no sockets, no trio.

A frame is a 10-byte big-endian header (length, stream id, type, flags)
followed by ``length`` bytes of data (see spec/ttrpc.md §1).  The decoder is
fed whatever the transport read and yields whole frames; a frame announcing
more than ``MESSAGE_LENGTH_MAX`` bytes is skipped without buffering its data
and reported as :class:`OversizedFrame` so the caller can answer
RESOURCE_EXHAUSTED while the byte stream stays in sync.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from google.protobuf.message import DecodeError

from ._pb import KeyValue, Request, Response, Status

__all__ = [
    "HEADER_SIZE",
    "MESSAGE_LENGTH_MAX",
    "Flags",
    "Frame",
    "FrameDecoder",
    "MalformedMessageError",
    "MessageType",
    "OversizedFrame",
    "OversizedMessageError",
    "decode_request",
    "decode_response",
    "encode_frame",
    "encode_request",
    "encode_response",
]

HEADER_SIZE = 10
MESSAGE_LENGTH_MAX = 4 << 20
STREAM_ID_MAX = 0xFFFFFFFF

_HEADER = struct.Struct(">IIBB")


class MessageType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3  # streaming only (ttrpc >= 1.2)


class Flags(IntFlag):
    REMOTE_CLOSED = 1
    REMOTE_OPEN = 2
    NO_DATA = 4


class OversizedMessageError(ValueError):
    """Refusal to encode a frame whose data exceeds MESSAGE_LENGTH_MAX."""


class MalformedMessageError(ValueError):
    """Frame data that does not decode as the expected protobuf message."""


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class OversizedFrame:
    """A frame whose announced ``length`` exceeded the limit; its data was skipped."""

    stream_id: int
    type: int
    length: int


def encode_frame(stream_id: int, msg_type: int, data: bytes, flags: int = 0) -> bytes:
    if len(data) > MESSAGE_LENGTH_MAX:
        raise OversizedMessageError(
            f"message length {len(data)} exceed maximum message size of {MESSAGE_LENGTH_MAX}"
        )
    return _HEADER.pack(len(data), stream_id, msg_type, flags) + data


class FrameDecoder:
    """Incremental frame parser.

    ``feed(data)`` appends bytes (``feed(b"")`` marks end of stream);
    ``next_event()`` returns the next :class:`Frame` or :class:`OversizedFrame`,
    or ``None`` when more bytes are needed.  At EOF, once ``next_event()``
    returned ``None``, ``pending_bytes > 0`` means the stream ended inside a
    frame (a truncated frame); its bytes are simply never reported as an event.
    Drain ``next_event()`` after each ``feed()``: the data of an oversized
    frame is then dropped as it arrives instead of being held in memory.
    """

    def __init__(self, max_length: int = MESSAGE_LENGTH_MAX) -> None:
        self._max_length = max_length
        self._buf = bytearray()
        # Header of an oversized frame whose data is being discarded, and how
        # many of its data bytes are still to be dropped.
        self._skipping: tuple[int, int, int] | None = None
        self._skip_left = 0
        self._skipped = 0
        self._eof = False

    @property
    def at_eof(self) -> bool:
        return self._eof

    @property
    def pending_bytes(self) -> int:
        """Bytes received that belong to a frame not yet reported."""
        partial = HEADER_SIZE + self._skipped if self._skipping is not None else 0
        return len(self._buf) + partial

    def feed(self, data: bytes) -> None:
        if self._eof:
            if data:
                raise RuntimeError("FrameDecoder fed data after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._skip_left:
            # Drop oversized data as it arrives instead of buffering it.
            n = min(self._skip_left, len(data))
            self._skip_left -= n
            self._skipped += n
            data = data[n:]
        self._buf += data

    def next_event(self) -> Frame | OversizedFrame | None:
        if self._skipping is not None:
            if self._skip_left:
                return None
            length, stream_id, msg_type = self._skipping
            self._skipping = None
            self._skipped = 0
            return OversizedFrame(stream_id, msg_type, length)
        if len(self._buf) < HEADER_SIZE:
            return None
        length, stream_id, msg_type, flags = _HEADER.unpack_from(self._buf)
        if length > self._max_length:
            del self._buf[:HEADER_SIZE]
            n = min(length, len(self._buf))
            del self._buf[:n]
            self._skipping = (length, stream_id, msg_type)
            self._skip_left = length - n
            self._skipped = n
            return self.next_event()
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        data = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return Frame(stream_id, msg_type, flags, data)


def decode_request(data: bytes) -> Request:
    try:
        return Request.FromString(data)
    except DecodeError as exc:
        raise MalformedMessageError(str(exc)) from exc


def decode_response(data: bytes) -> Response:
    try:
        return Response.FromString(data)
    except DecodeError as exc:
        raise MalformedMessageError(str(exc)) from exc


def encode_request(
    stream_id: int,
    service: str,
    method: str,
    payload: bytes,
    timeout_nano: int = 0,
    metadata: Iterable[tuple[str, str]] = (),
) -> bytes:
    req = Request(
        service=service,
        method=method,
        payload=payload,
        timeout_nano=timeout_nano,
        metadata=[KeyValue(key=k, value=v) for k, v in metadata],
    )
    return encode_frame(stream_id, MessageType.REQUEST, req.SerializeToString())


def encode_response(stream_id: int, *, payload: bytes = b"", status: Status | None = None) -> bytes:
    # Success leaves ``status`` unset, as the Go server does; an empty payload
    # is omitted by proto3 anyway, so an OK Empty response is a bare header.
    resp = Response(payload=payload)
    if status is not None:
        resp.status.CopyFrom(status)
    return encode_frame(stream_id, MessageType.RESPONSE, resp.SerializeToString())
