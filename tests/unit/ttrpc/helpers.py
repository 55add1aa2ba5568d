"""Shared test plumbing: a raw frame-level peer and a small test service."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from shimv2.api.ttrpc.request_pb2 import Response
from shimv2.ttrpc import Method, RequestContext, Server
from shimv2.ttrpc.status import not_found
from shimv2.ttrpc.wire import Frame, FrameDecoder, MessageType, encode_request

SERVICE = "test.v1.Echo"
TIMEOUT = 10


class Peer:
    """The far end of a connection, speaking raw frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(
        self, stream_id: int, method: str, payload: bytes = b"", service: str = SERVICE, **kw
    ) -> None:
        await self.send(encode_request(stream_id, service, method, payload, **kw))

    async def frame(self) -> Frame:
        with trio.fail_after(TIMEOUT):
            while True:
                event = self.decoder.next_event()
                if event is not None:
                    assert isinstance(event, Frame)
                    return event
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("server closed the connection")
                self.decoder.feed(data)

    async def response(self) -> tuple[int, Response]:
        frame = await self.frame()
        assert frame.type == MessageType.RESPONSE
        assert frame.flags == 0
        return frame.stream_id, Response.FromString(frame.data)

    async def call(self, stream_id: int, method: str, payload: bytes = b"", **kw) -> Response:
        await self.request(stream_id, method, payload, **kw)
        got_id, resp = await self.response()
        assert got_id == stream_id
        return resp

    async def echo_ok(self, stream_id: int, text: str = "ping") -> None:
        """Proof of life: the connection still answers a normal request."""
        resp = await self.call(stream_id, "Echo", StringValue(value=text).SerializeToString())
        assert not resp.HasField("status")
        assert StringValue.FromString(resp.payload).value == text


#: The default of EchoService(plain=...): test_server runs each test both ways.
PLAIN = False

#: Handlers that never wait; with ``EchoService(plain=True)`` they are plain
#: functions, which the server answers from its read loop without a task.
IMMEDIATE = ("Echo", "Empty", "Fail", "Missing", "Typed", "Big", "None", "Sized")


def plain(handler: Callable[[Any, RequestContext], Awaitable[Any]]) -> Callable[..., Any]:
    """An ``async def`` handler that never waits, as a plain function."""

    def run(req: Any, ctx: RequestContext) -> Any:
        coro = handler(req, ctx)
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        coro.close()
        raise AssertionError(f"{handler.__name__} waited: it cannot be a plain handler")

    return run


class EchoService:
    """Handlers covering each server rule; records what it saw."""

    def __init__(self, *, plain: bool | None = None) -> None:
        self.plain = PLAIN if plain is None else plain
        self.release = trio.Event()
        self.block_started = trio.Event()
        self.block_finished = trio.Event()
        self.contexts: list[RequestContext] = []

    async def echo(self, req: StringValue, ctx: RequestContext) -> StringValue:
        self.contexts.append(ctx)
        return StringValue(value=req.value)

    async def empty(self, req: Empty, ctx: RequestContext) -> Empty:
        return Empty()

    async def block(self, req: Empty, ctx: RequestContext) -> StringValue:
        self.contexts.append(ctx)
        self.block_started.set()
        # Like a shim's Wait: stop waiting when released or when the peer leaves.
        async with trio.open_nursery() as nursery:

            async def watch(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch, self.release)
            nursery.start_soon(watch, ctx.disconnected)
        await trio.sleep(0.01)  # still running after disconnect: not cancelled
        self.block_finished.set()
        return StringValue(value="released")

    async def sleep(self, req: Empty, ctx: RequestContext) -> Empty:
        self.contexts.append(ctx)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def fail(self, req: Empty, ctx: RequestContext) -> Empty:
        raise RuntimeError("boom")

    async def missing(self, req: Empty, ctx: RequestContext) -> Empty:
        raise FileNotFoundError(2, "No such file or directory", "/nope")

    async def typed(self, req: Empty, ctx: RequestContext) -> Empty:
        raise not_found("process does not exist e1")

    async def big(self, req: Empty, ctx: RequestContext) -> BytesValue:
        return BytesValue(value=b"x" * (5 << 20))

    async def none(self, req: Empty, ctx: RequestContext) -> Empty:
        return None  # type: ignore[return-value]

    async def sized(self, req: StringValue, ctx: RequestContext) -> BytesValue:
        # Large distinct payloads make interleaved (torn) writes detectable.
        return BytesValue(value=req.value.encode() * 20000)

    def methods(self) -> dict[str, Method]:
        methods = self._methods()
        if self.plain:
            for name in IMMEDIATE:
                methods[name] = Method(methods[name].request_type, plain(methods[name].handler))
        return methods

    def _methods(self) -> dict[str, Method]:
        return {
            "Echo": Method(StringValue, self.echo),
            "Empty": Method(Empty, self.empty),
            "Block": Method(Empty, self.block),
            "Sleep": Method(Empty, self.sleep),
            "Fail": Method(Empty, self.fail),
            "Missing": Method(Empty, self.missing),
            "Typed": Method(Empty, self.typed),
            "Big": Method(Empty, self.big),
            "None": Method(Empty, self.none),
            "Sized": Method(StringValue, self.sized),
        }


def make_server(svc: EchoService | None = None, **kw) -> tuple[Server, EchoService]:
    svc = svc or EchoService()
    server = Server(**kw)
    server.register_service(SERVICE, svc.methods())
    return server, svc


@asynccontextmanager
async def served_pair(server: Server) -> AsyncIterator[Peer]:
    """A socketpair with the server on one end and a raw Peer on the other."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, trio.socket.from_stdlib_socket(a))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
        try:
            yield Peer(stream)
        finally:
            await stream.aclose()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def listening(server: Server, path: str) -> AsyncIterator[str]:
    """Run ``server.serve`` on a listening unix socket at ``path``."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, sock)
        try:
            yield path
        finally:
            nursery.cancel_scope.cancel()
            sock.close()


@asynccontextmanager
async def connected(addr: str | bytes) -> AsyncIterator[Peer]:
    """A raw Peer connected to a listening socket (a path or an abstract name)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(addr)
        stream = trio.SocketStream(sock)
        try:
            yield Peer(stream)
        finally:
            await stream.aclose()
