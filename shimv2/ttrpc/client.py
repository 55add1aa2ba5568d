"""trio ttrpc client (the shim's Events.Forward publisher, tests, tooling).

Stream ids start at 1 and grow by 2; the id is allocated and its frame
written under one lock so ids reach the wire strictly increasing, which
ttrpc >= 1.2 servers require (spec/ttrpc.md §6).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from ._pb import Response
from .status import Code, TTRPCError
from .wire import (
    MESSAGE_LENGTH_MAX,
    STREAM_ID_MAX,
    Frame,
    FrameDecoder,
    MalformedMessageError,
    MessageType,
    OversizedFrame,
    OversizedMessageError,
    decode_response,
    encode_request,
)

__all__ = ["Client", "ConnectionClosedError", "connect"]

M = TypeVar("M", bound=Message)

_READ_SIZE = 64 * 1024


class ConnectionClosedError(ConnectionError):
    """The connection ended (or was never usable) before the answer arrived."""


class _Call:
    """One outstanding call: the reader fills it in and sets ``done``."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: Response | None = None
        self.error: BaseException | None = None

    def finish(self, response: Response | None = None, error: BaseException | None = None) -> None:
        self.response, self.error = response, error
        self.done.set()


class Client:
    """A ttrpc client over a connected stream; use :func:`connect` to get one."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()
        self._next_id = 1
        self._calls: dict[int, _Call] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> M:
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        payload = request.SerializeToString()
        # Go's MD helpers lower-case keys; servers look them up lower-cased.
        md = [(k.lower(), v) for k, v in metadata]
        call = _Call()
        stream_id = 0
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                async with self._send_lock:
                    stream_id = self._allocate_id()
                    timeout_nano = 0
                    if timeout is not None:
                        # Relative time left at send, like Go; never 0 ("no deadline").
                        timeout_nano = max(1, int((deadline - trio.current_time()) * 1e9))
                    try:
                        frame = encode_request(
                            stream_id, service, method, payload, timeout_nano, md
                        )
                    except OversizedMessageError as exc:
                        raise TTRPCError(Code.RESOURCE_EXHAUSTED, str(exc)) from None
                    self._calls[stream_id] = call
                    await self._send(frame)
                await call.done.wait()
            finally:
                # Abandoned calls forget their id so a late response is dropped.
                self._calls.pop(stream_id, None)
        # An answer that raced with the deadline still wins.
        if call.error is not None:
            raise call.error
        if call.response is not None:
            return _unwrap(call.response, response_type)
        assert scope.cancelled_caught
        raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")

    def _allocate_id(self) -> int:
        if self._closed:
            raise ConnectionClosedError("ttrpc: closed")
        stream_id = self._next_id
        if stream_id > STREAM_ID_MAX:
            # Go does not handle wrap-around either; the caller should reconnect.
            raise ConnectionClosedError("ttrpc: stream ids exhausted, reconnect")
        self._next_id += 2
        return stream_id

    async def _send(self, frame: bytes) -> None:
        # Our own send loop so we know whether a cancellation (the call's
        # timeout) left half a frame on the wire: only then is the connection
        # unusable for later calls.
        sock = self._stream.socket
        view = memoryview(frame)
        sent = 0
        try:
            while sent < len(view):
                sent += await sock.send(view[sent:])
        except OSError as exc:
            self._shutdown()
            raise ConnectionClosedError(f"ttrpc: connection closed: {exc}") from None
        except trio.ClosedResourceError:
            self._shutdown()
            raise ConnectionClosedError("ttrpc: connection closed") from None
        except BaseException:
            if sent:
                self._shutdown()
            raise

    async def run_reader(self) -> None:
        """Read responses until the connection ends; :func:`connect` runs this."""
        decoder = FrameDecoder()
        try:
            while not decoder.at_eof:
                data = await self._stream.receive_some(_READ_SIZE)
                decoder.feed(data)
                while (event := decoder.next_event()) is not None:
                    self._on_event(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._shutdown()

    def _on_event(self, event: Frame | OversizedFrame) -> None:
        if event.type != MessageType.RESPONSE:
            return  # no streaming support: ignore Data and unknown types
        call = self._calls.pop(event.stream_id, None)
        if call is None:
            return  # late answer to an abandoned call
        if isinstance(event, OversizedFrame):
            call.finish(
                error=TTRPCError(
                    Code.RESOURCE_EXHAUSTED,
                    f"message length {event.length} exceed maximum message size of "
                    f"{MESSAGE_LENGTH_MAX}",
                )
            )
            return
        try:
            call.finish(response=decode_response(event.data))
        except MalformedMessageError as exc:
            call.finish(error=TTRPCError(Code.INTERNAL, f"ttrpc: invalid response: {exc}"))

    def _shutdown(self) -> None:
        """Mark closed, close the socket, and fail every waiting call."""
        if not self._closed:
            self._closed = True
            # Synchronous close: usable from finally blocks; wakes the reader.
            self._stream.socket.close()
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.finish(error=ConnectionClosedError("ttrpc: connection closed"))

    async def aclose(self) -> None:
        self._shutdown()
        await trio.lowlevel.checkpoint()


def _unwrap(response: Response, response_type: type[M]) -> M:
    # Absent status or code 0 both mean OK (Go client rule).
    if response.HasField("status") and response.status.code != Code.OK:
        raise TTRPCError.from_status(response.status)
    try:
        return response_type.FromString(response.payload)
    except DecodeError as exc:
        raise TTRPCError(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}") from None


@asynccontextmanager
async def connect(path: str) -> AsyncIterator[Client]:
    """Connect to a ttrpc server on a unix socket (``unix://`` prefix optional)."""
    path = path.removeprefix("unix://")
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise ConnectionClosedError(f"ttrpc: dial {path}: {exc}") from exc
    client = Client(stream)
    # The caller's block runs inside our nursery; trio would wrap whatever it
    # raises in an ExceptionGroup. Carry it out of the nursery by hand so
    # `except TTRPCError` / `except OSError` around `connect` keep working.
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run_reader)
            try:
                yield client
            except BaseException as exc:
                raised = exc
            finally:
                client._shutdown()  # synchronous: no checkpoint while cancelled
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()
    if raised is not None:
        raise raised
