"""Client rules (spec/ttrpc.md §6, §8) against the real server and a raw fake."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from shimv2.api.google.rpc.status_pb2 import Status
from shimv2.api.ttrpc.request_pb2 import Request
from shimv2.ttrpc import Code, ConnectionClosedError, TTRPCError, connect
from shimv2.ttrpc.wire import MESSAGE_LENGTH_MAX, FrameDecoder, MessageType, encode_response

from .helpers import SERVICE, TIMEOUT, listening, make_server

Send = Callable[[bytes], Awaitable[None]]
Respond = Callable[[int, Request, Send], Awaitable[None]]


class RawServer:
    """A hand-written server end that records requests as they hit the wire."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[tuple[int, Request]] = []
        self.connections: list[trio.SocketStream] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections.append(stream)
        lock = trio.Lock()

        async def send(data: bytes) -> None:
            async with lock:
                await stream.send_all(data)

        decoder = FrameDecoder()
        async with trio.open_nursery() as nursery:
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                while data := await stream.receive_some(65536):
                    decoder.feed(data)
                    while (frame := decoder.next_event()) is not None:
                        assert frame.type == MessageType.REQUEST
                        req = Request.FromString(frame.data)
                        self.requests.append((frame.stream_id, req))
                        nursery.start_soon(self.respond, frame.stream_id, req, send)


@asynccontextmanager
async def raw_server(path: str, respond: Respond) -> AsyncIterator[RawServer]:
    raw = RawServer(respond)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, raw.handle, [listener])
        yield raw
        nursery.cancel_scope.cancel()


async def echo_payload(stream_id: int, req: Request, send: Send) -> None:
    await send(encode_response(stream_id, payload=req.payload))


def sv(text: str) -> StringValue:
    return StringValue(value=text)


async def test_roundtrip_against_server(tmp_path) -> None:
    server, _ = make_server()
    async with listening(server, str(tmp_path / "s.sock")) as path:
        async with connect("unix://" + path) as client:
            assert not client.closed
            assert (await client.call(SERVICE, "Echo", sv("hi"), StringValue)).value == "hi"
            assert await client.call(SERVICE, "Empty", Empty(), Empty) == Empty()
            with pytest.raises(TTRPCError) as info:
                await client.call(SERVICE, "Typed", Empty(), Empty)
            assert info.value.code == Code.NOT_FOUND
            assert str(info.value) == "process does not exist e1: not found"
            with pytest.raises(TTRPCError) as info:
                await client.call(SERVICE, "Nope", Empty(), Empty)
            assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Nope")
        assert client.closed
        async with connect(path) as client:  # a bare path works too
            assert (await client.call(SERVICE, "Echo", sv("again"), StringValue)).value == "again"


async def test_concurrent_calls_get_strictly_increasing_odd_ids(tmp_path) -> None:
    n = 40
    pending: list[tuple[int, Request, Send]] = []

    async def respond_in_reverse(stream_id: int, req: Request, send: Send) -> None:
        pending.append((stream_id, req, send))
        if len(pending) == n:
            for sid, r, s in reversed(pending):  # answers out of order
                await s(encode_response(sid, payload=r.payload))

    async with (
        raw_server(str(tmp_path / "s.sock"), respond_in_reverse) as raw,
        connect(str(tmp_path / "s.sock")) as client,
    ):
        results: dict[int, str] = {}

        # ~100 KiB each: sends block on a full socket buffer, so tasks interleave.
        async def one(i: int) -> None:
            results[i] = (
                await client.call("s", "m", sv(f"{i}:" + "x" * 100_000), StringValue)
            ).value

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
    assert [sid for sid, _ in raw.requests] == list(range(1, 2 * n, 2))
    assert results == {i: f"{i}:" + "x" * 100_000 for i in range(n)}  # each its own answer


async def test_ok_status_with_code_zero_is_success(tmp_path) -> None:
    async def respond(stream_id: int, req: Request, send: Send) -> None:
        await send(encode_response(stream_id, payload=req.payload, status=Status(code=0)))

    async with (
        raw_server(str(tmp_path / "s.sock"), respond),
        connect(str(tmp_path / "s.sock")) as client,
    ):
        assert (await client.call("s", "m", sv("ok"), StringValue)).value == "ok"


async def test_timeout_sends_timeout_nano_and_drops_late_response(tmp_path) -> None:
    async def slow_first(stream_id: int, req: Request, send: Send) -> None:
        if stream_id == 1:
            await trio.sleep(0.3)  # arrives after the caller gave up
        await send(encode_response(stream_id, payload=req.payload))

    async with (
        raw_server(str(tmp_path / "s.sock"), slow_first) as raw,
        connect(str(tmp_path / "s.sock")) as client,
    ):
        with pytest.raises(TTRPCError) as info:
            await client.call("s", "m", sv("late"), StringValue, timeout=0.1)
        assert info.value.code == Code.DEADLINE_EXCEEDED
        assert not client.closed
        await trio.sleep(0.4)  # the late answer for id 1 comes and is dropped
        assert (await client.call("s", "m", sv("next"), StringValue)).value == "next"
    (sid1, req1), (sid2, req2) = raw.requests
    assert (sid1, sid2) == (1, 3)
    assert 0 < req1.timeout_nano <= 100_000_000
    assert req2.timeout_nano == 0


async def test_timeout_against_server_deadline(tmp_path) -> None:
    server, svc = make_server()
    async with listening(server, str(tmp_path / "s.sock")) as path, connect(path) as client:
        with pytest.raises(TTRPCError) as info:
            await client.call(SERVICE, "Sleep", Empty(), Empty, timeout=0.05)
        assert info.value.code == Code.DEADLINE_EXCEEDED
        assert svc.contexts[0].deadline is not None
        assert (await client.call(SERVICE, "Echo", sv("x"), StringValue)).value == "x"


async def test_expired_timeout_sends_nothing(tmp_path) -> None:
    async with (
        raw_server(str(tmp_path / "s.sock"), echo_payload) as raw,
        connect(str(tmp_path / "s.sock")) as client,
    ):
        with pytest.raises(TTRPCError) as info:
            await client.call("s", "m", sv("x"), StringValue, timeout=0)
        assert info.value.code == Code.DEADLINE_EXCEEDED
        assert (await client.call("s", "m", sv("y"), StringValue)).value == "y"
    assert [sid for sid, _ in raw.requests] == [1]


async def test_metadata_is_sent_lower_cased(tmp_path) -> None:
    async with (
        raw_server(str(tmp_path / "s.sock"), echo_payload) as raw,
        connect(str(tmp_path / "s.sock")) as client,
    ):
        md = [("Containerd-Namespace-TTRPC", "default"), ("x", "1"), ("x", "2")]
        await client.call("svc", "Forward", sv(""), StringValue, metadata=md)
    [(_, req)] = raw.requests
    assert (req.service, req.method) == ("svc", "Forward")
    assert [(kv.key, kv.value) for kv in req.metadata] == [
        ("containerd-namespace-ttrpc", "default"),
        ("x", "1"),
        ("x", "2"),
    ]


async def test_connection_closed_before_answer(tmp_path) -> None:
    raw_ref: list[RawServer] = []

    async def hang_up(stream_id: int, req: Request, send: Send) -> None:
        await raw_ref[0].connections[0].aclose()

    async with raw_server(str(tmp_path / "s.sock"), hang_up) as raw:
        raw_ref.append(raw)
        async with connect(str(tmp_path / "s.sock")) as client:
            with trio.fail_after(TIMEOUT), pytest.raises(ConnectionClosedError):
                await client.call("s", "m", sv("x"), StringValue)
            assert client.closed
            with pytest.raises(ConnectionClosedError) as info:
                await client.call("s", "m", sv("x"), StringValue)
            assert isinstance(info.value, ConnectionError)


async def test_aclose_fails_pending_calls(tmp_path) -> None:
    async def never(stream_id: int, req: Request, send: Send) -> None:
        await trio.sleep_forever()

    async with (
        raw_server(str(tmp_path / "s.sock"), never),
        connect(str(tmp_path / "s.sock")) as client,
    ):
        errors: list[BaseException] = []

        async def pending_call() -> None:
            try:
                await client.call("s", "m", sv("x"), StringValue)
            except ConnectionClosedError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pending_call)
            await trio.sleep(0.05)
            await client.aclose()
        assert len(errors) == 1 and client.closed


async def test_connect_to_missing_socket(tmp_path) -> None:
    with pytest.raises(ConnectionClosedError):
        async with connect(str(tmp_path / "absent.sock")):
            pass


async def test_oversized_request_is_refused_locally(tmp_path) -> None:
    async with (
        raw_server(str(tmp_path / "s.sock"), echo_payload) as raw,
        connect(str(tmp_path / "s.sock")) as client,
    ):
        big = BytesValue(value=b"x" * MESSAGE_LENGTH_MAX)
        with pytest.raises(TTRPCError) as info:
            await client.call("s", "m", big, BytesValue)
        assert info.value.code == Code.RESOURCE_EXHAUSTED
        assert (await client.call("s", "m", sv("ok"), StringValue)).value == "ok"
    # Nothing went out for the refused call; ids still increase.
    assert [sid for sid, _ in raw.requests] == [3]


async def test_undecodable_response_payload(tmp_path) -> None:
    async def garbage(stream_id: int, req: Request, send: Send) -> None:
        await send(encode_response(stream_id, payload=b"\xff\xff"))

    async with (
        raw_server(str(tmp_path / "s.sock"), garbage),
        connect(str(tmp_path / "s.sock")) as client,
    ):
        with pytest.raises(TTRPCError) as info:
            await client.call("s", "m", sv("x"), StringValue)
        assert info.value.code == Code.INTERNAL
        assert not client.closed


async def test_errors_in_the_block_are_not_wrapped_in_exception_groups(tmp_path) -> None:
    async def fail(stream_id: int, req: Request, send: Send) -> None:
        await send(encode_response(stream_id, status=Status(code=Code.UNAVAILABLE, message="no")))

    path = str(tmp_path / "s.sock")
    async with raw_server(path, fail):
        # Callers write `except TTRPCError` around `async with connect(...)`.
        with pytest.raises(TTRPCError):
            async with connect(path) as client:
                await client.call("s", "m", sv("x"), StringValue)
        with pytest.raises(KeyError):
            async with connect(path):
                raise KeyError("mine")
        # An outer timeout still cancels cleanly through the client's nursery.
        with trio.move_on_after(0.05) as scope:
            async with connect(path) as client:
                await trio.sleep_forever()
        assert scope.cancelled_caught and client.closed
