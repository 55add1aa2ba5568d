"""The sans-I/O codec: framing, limits and the errdefs-style status helpers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shimv2.api.google.rpc.status_pb2 import Status
from shimv2.api.ttrpc.request_pb2 import Request, Response
from shimv2.ttrpc import status
from shimv2.ttrpc.status import Code, TTRPCError, error_from_exception
from shimv2.ttrpc.wire import (
    HEADER_SIZE,
    MESSAGE_LENGTH_MAX,
    Flags,
    Frame,
    FrameDecoder,
    MalformedMessageError,
    MessageType,
    OversizedFrame,
    OversizedMessageError,
    decode_request,
    encode_frame,
    encode_request,
    encode_response,
)

# ttrpc.md §2.6, captured from containerd 1.6.20 talking to a Go shim.
OBSERVED_REQUEST = (
    bytes.fromhex("00000026 00000007 01 00")
    + b"\x0a\x17containerd.task.v2.Task"
    + b"\x12\x05Start"
    + b"\x1a\x04\x0a\x02t1"
)
OBSERVED_RESPONSE = bytes.fromhex("00000005 00000007 02 00 1203089c6c")
OBSERVED_ERROR_DATA = b"\x0a\x28\x08\x05\x12\x24process does not exist e1: not found"


def decode_all(data: bytes, chunk: int | None = None, **kw) -> list[Frame | OversizedFrame]:
    decoder = FrameDecoder(**kw)
    events: list[Frame | OversizedFrame] = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        decoder.feed(data[i : i + step])
        while (event := decoder.next_event()) is not None:
            events.append(event)
    decoder.feed(b"")
    assert decoder.next_event() is None
    return events


def test_constants() -> None:
    assert HEADER_SIZE == 10
    assert MESSAGE_LENGTH_MAX == 4194304
    assert [int(t) for t in MessageType] == [1, 2, 3]
    assert (Flags.REMOTE_CLOSED, Flags.REMOTE_OPEN, Flags.NO_DATA) == (1, 2, 4)


def test_observed_request_bytes() -> None:
    frame = encode_request(7, "containerd.task.v2.Task", "Start", b"\x0a\x02t1")
    assert frame == OBSERVED_REQUEST
    [event] = decode_all(OBSERVED_REQUEST)
    assert event == Frame(stream_id=7, type=MessageType.REQUEST, flags=0, data=frame[10:])
    req = decode_request(event.data)
    assert (req.service, req.method, req.payload) == (
        "containerd.task.v2.Task",
        "Start",
        b"\n\x02t1",
    )
    assert req.timeout_nano == 0 and len(req.metadata) == 0


def test_observed_response_bytes() -> None:
    # Success: status omitted, payload = StartResponse{pid=13852}.
    assert encode_response(7, payload=b"\x08\x9c\x6c") == OBSERVED_RESPONSE
    [event] = decode_all(OBSERVED_RESPONSE)
    assert isinstance(event, Frame)
    resp = Response.FromString(event.data)
    assert not resp.HasField("status")


def test_observed_error_response_bytes() -> None:
    err = status.not_found("process does not exist e1")
    frame = encode_response(7, status=err.to_status())
    assert frame[10:] == OBSERVED_ERROR_DATA
    assert frame[:10] == struct.pack(">IIBB", len(OBSERVED_ERROR_DATA), 7, 2, 0)


def test_empty_ok_response_is_a_zero_length_frame() -> None:
    frame = encode_response(9)
    assert frame == bytes.fromhex("00000000 00000009 02 00")
    assert decode_all(frame) == [Frame(9, MessageType.RESPONSE, 0, b"")]


def test_zero_length_frames_between_others() -> None:
    data = encode_frame(1, 1, b"") + encode_frame(3, 1, b"abc") + encode_frame(5, 2, b"")
    assert decode_all(data) == [
        Frame(1, 1, 0, b""),
        Frame(3, 1, 0, b"abc"),
        Frame(5, 2, 0, b""),
    ]


def test_decoder_fed_one_byte_at_a_time() -> None:
    data = OBSERVED_REQUEST + OBSERVED_RESPONSE + encode_frame(11, 3, b"x", Flags.REMOTE_CLOSED)
    assert decode_all(data, chunk=1) == decode_all(data)
    assert len(decode_all(data, chunk=1)) == 3


def test_flags_and_types_are_passed_through() -> None:
    data = encode_frame(0xFFFFFFFF, 0xFF, b"z", 0xFF)
    assert decode_all(data) == [Frame(0xFFFFFFFF, 0xFF, 0xFF, b"z")]


def test_oversized_frame_is_skipped_without_buffering() -> None:
    length = 5 << 20
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">IIBB", length, 3, 1, 0))
    assert decoder.next_event() is None
    chunk = b"\0" * 65536
    for _ in range(length // len(chunk) - 1):
        decoder.feed(chunk)
        assert decoder.next_event() is None
        assert len(decoder._buf) == 0  # skipped bytes never accumulate
    assert decoder.pending_bytes == HEADER_SIZE + length - len(chunk)
    after = encode_frame(5, 1, b"next")
    decoder.feed(chunk + after[:4])
    assert decoder.next_event() == OversizedFrame(stream_id=3, type=1, length=length)
    assert decoder.next_event() is None
    decoder.feed(after[4:])
    assert decoder.next_event() == Frame(5, 1, 0, b"next")
    assert decoder.pending_bytes == 0


def test_oversized_frame_in_one_feed() -> None:
    data = struct.pack(">IIBB", 100, 1, 1, 0) + b"y" * 100 + encode_frame(3, 1, b"ok")
    events = decode_all(data, max_length=99)
    assert events == [OversizedFrame(1, 1, 100), Frame(3, 1, 0, b"ok")]


def test_exactly_max_length_is_accepted() -> None:
    data = encode_frame(1, 2, b"a" * MESSAGE_LENGTH_MAX)
    [event] = decode_all(data, chunk=1 << 20)
    assert isinstance(event, Frame) and len(event.data) == MESSAGE_LENGTH_MAX


def test_encode_refuses_oversized() -> None:
    with pytest.raises(OversizedMessageError) as info:
        encode_frame(1, 2, b"a" * (MESSAGE_LENGTH_MAX + 1))
    assert isinstance(info.value, ValueError)
    assert "exceed maximum message size of 4194304" in str(info.value)


def test_truncated_frame_at_eof() -> None:
    decoder = FrameDecoder()
    assert not decoder.at_eof
    decoder.feed(OBSERVED_RESPONSE[:-2])
    assert decoder.next_event() is None
    decoder.feed(b"")
    assert decoder.at_eof
    assert decoder.next_event() is None
    assert decoder.pending_bytes == len(OBSERVED_RESPONSE) - 2
    decoder.feed(b"")  # repeated EOF is harmless
    with pytest.raises(RuntimeError):
        decoder.feed(b"more")


def test_truncated_header_and_clean_eof() -> None:
    decoder = FrameDecoder()
    decoder.feed(OBSERVED_RESPONSE + b"\0\0\0")
    decoder.feed(b"")
    assert isinstance(decoder.next_event(), Frame)
    assert decoder.next_event() is None
    assert decoder.pending_bytes == 3
    clean = FrameDecoder()
    clean.feed(OBSERVED_RESPONSE)
    clean.feed(b"")
    assert clean.next_event() is not None and clean.next_event() is None
    assert clean.pending_bytes == 0


def test_decode_request_errors() -> None:
    with pytest.raises(MalformedMessageError):
        decode_request(b"\xff\xff\xff")
    assert decode_request(b"") == Request()


def test_encode_request_with_timeout_and_metadata() -> None:
    frame = encode_request(1, "s", "m", b"p", timeout_nano=5, metadata=[("k", "a"), ("k", "b")])
    req = decode_request(frame[10:])
    assert req.timeout_nano == 5
    assert [(kv.key, kv.value) for kv in req.metadata] == [("k", "a"), ("k", "b")]


# --- status ---------------------------------------------------------------


def test_codes() -> None:
    names = [
        "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS "
        "PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE "
        "UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED"
    ][0].split()
    assert [c.name for c in Code] == names
    assert [int(c) for c in Code] == list(range(17))


@pytest.mark.parametrize(
    ("make", "code", "suffix"),
    [
        (status.not_found, Code.NOT_FOUND, "not found"),
        (status.already_exists, Code.ALREADY_EXISTS, "already exists"),
        (status.invalid_argument, Code.INVALID_ARGUMENT, "invalid argument"),
        (status.failed_precondition, Code.FAILED_PRECONDITION, "failed precondition"),
        (status.unavailable, Code.UNAVAILABLE, "unavailable"),
        (status.unimplemented, Code.UNIMPLEMENTED, "not implemented"),
    ],
)
def test_errdefs_constructors(make, code: Code, suffix: str) -> None:
    err = make("thing x")
    assert err.code == code
    assert err.message == f"thing x: {suffix}" == str(err)
    # Never doubled, and the bare class text stays bare.
    assert make(f"thing x: {suffix}").message == f"thing x: {suffix}"
    assert make(suffix).message == suffix
    assert make("").message == suffix


def test_plain_constructors() -> None:
    assert (status.unknown("runc failed").code, status.unknown("runc failed").message) == (
        Code.UNKNOWN,
        "runc failed",
    )
    err = status.deadline_exceeded("too slow")
    assert (err.code, err.message) == (Code.DEADLINE_EXCEEDED, "too slow")


def test_status_roundtrip() -> None:
    err = TTRPCError(Code.NOT_FOUND, "gone: not found")
    st = err.to_status()
    assert (st.code, st.message) == (5, "gone: not found")
    back = TTRPCError.from_status(st)
    assert (back.code, back.message) == (Code.NOT_FOUND, "gone: not found")
    assert TTRPCError.from_status(Status(code=99, message="?")).code == Code.UNKNOWN


def test_error_from_exception() -> None:
    original = status.not_found("x")
    assert error_from_exception(original) is original
    cases = [
        (FileNotFoundError(2, "No such file or directory"), Code.NOT_FOUND),
        (FileExistsError(17, "File exists"), Code.ALREADY_EXISTS),
        (PermissionError(13, "Permission denied"), Code.PERMISSION_DENIED),
        (RuntimeError("boom"), Code.UNKNOWN),
    ]
    for exc, code in cases:
        err = error_from_exception(exc)
        assert err.code == code
        assert err.message == str(exc)


# --- fuzz -----------------------------------------------------------------

frames = st.lists(
    st.tuples(
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=80),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(frames=frames, chunk=st.integers(1, 64))
def test_fuzz_decoder_roundtrip(frames, chunk: int) -> None:
    """Any framing of any data decodes back, oversized ones (> 40) as skips."""
    data = b"".join(struct.pack(">IIBB", len(d), sid, t, f) + d for sid, t, f, d in frames)
    expected = [
        Frame(sid, t, f, d) if len(d) <= 40 else OversizedFrame(sid, t, len(d))
        for sid, t, f, d in frames
    ]
    assert decode_all(data, chunk=chunk, max_length=40) == expected


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), chunk=st.integers(1, 50))
def test_fuzz_decoder_random_bytes(data: bytes, chunk: int) -> None:
    """Arbitrary bytes never raise; every byte is reported or pending."""
    decoder = FrameDecoder(max_length=64)
    consumed = 0
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
        while (event := decoder.next_event()) is not None:
            consumed += HEADER_SIZE + (
                len(event.data) if isinstance(event, Frame) else event.length
            )
    decoder.feed(b"")
    assert decoder.next_event() is None
    assert consumed + decoder.pending_bytes == len(data)
