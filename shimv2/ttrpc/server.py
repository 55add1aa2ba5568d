"""trio ttrpc server: a thin I/O loop around :mod:`shimv2.ttrpc.wire`.

Rules that matter for a shim (spec/ttrpc.md §7, pitfalls 2, 3, 17):

* every request to an ``async def`` handler runs in its own task, so a
  ``Wait`` blocked for the container's lifetime never stalls other calls on
  the same connection; a plain ``def`` handler (one that never waits, like
  ``State``) is answered from the read loop itself, which saves the task and
  two passes of the scheduler per call;
* a bad frame or a failing handler is answered with an error status; the
  connection is never closed for it (containerd would take that as "shim died");
* handler tasks live in a nursery owned by the server, not by the connection:
  a peer hanging up only sets ``ctx.disconnected`` and discards the answer,
  it never cancels a half-done ``Create``;
* back-pressure: a connection owes at most MAX_IN_FLIGHT answers (and
  MAX_PENDING_BYTES of requests and unwritten answers); past that it is not
  read until answers went out, so a peer that never reads costs a bounded
  amount of memory and the kernel's socket buffers make its writes block.
  A request that waits for an event (``Wait``, in ``ctx.cancel_on_disconnect``)
  is "parked" and does not count there: containerd keeps one per process on
  the same connection, and they must never hold up other calls. Only the
  total, parked included, has a bound (MAX_OWED), far above any real use.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf.message import DecodeError, Message

from ._pb import Request, Status
from .status import Code, TTRPCError, error_from_exception
from .wire import (
    MESSAGE_LENGTH_MAX,
    Frame,
    FrameDecoder,
    MalformedMessageError,
    MessageType,
    OversizedFrame,
    OversizedMessageError,
    decode_request,
    encode_response,
)

__all__ = [
    "Method",
    "RequestContext",
    "Server",
    "credentials_allowed",
    "peer_credentials",
]

log = logging.getLogger("shimv2.ttrpc")

_READ_SIZE = 64 * 1024
# Per-connection back-pressure (see the module docstring). Go's server stops
# reading once its single writer blocks; these bounds allow some pipelining.
MAX_IN_FLIGHT = 64  # answers owed, parked requests excepted
MAX_PENDING_BYTES = 1 << 20  # their requests' data and unwritten answer frames
MAX_OWED = 1024  # answers owed, parked included (a parked Wait costs ~5 KiB)
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_BACKOFF_MIN = 0.001
_BACKOFF_MAX = 1.0
# accept(2) errors that mean the listener itself is unusable: retrying is pointless.
_FATAL_ACCEPT_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EOPNOTSUPP})

Handler = Callable[[Any, "RequestContext"], Awaitable[Message]]
SyncHandler = Callable[[Any, "RequestContext"], Message]


@dataclass
class Method:
    """A method's request type and its handler: ``async def`` when it may wait,
    a plain ``def`` when it never does (answered without a task of its own)."""

    request_type: type[Message]
    handler: Handler | SyncHandler
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        self.is_async = inspect.iscoroutinefunction(self.handler)


@dataclass
class RequestContext:
    service: str
    method: str
    stream_id: int
    metadata: dict[str, list[str]]
    deadline: float | None  # in trio.current_time() units; None = no timeout_nano
    peer_pid: int
    disconnected: trio.Event  # set when the connection this request came on ends
    # Cancel scopes of this connection's requests to cancel when it ends.
    _disconnect_scopes: set[trio.CancelScope] = field(default_factory=set, repr=False)
    _connection: _Connection | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def cancel_on_disconnect(self) -> Iterator[trio.CancelScope]:
        """A cancel scope cancelled when the connection ends (at once if it has):
        for a call that blocks until something happens, like Wait. A task watching
        ``disconnected`` would cost its start and its cancellation (two scheduler
        passes) at the answer. Inside it the request is parked: it no longer
        counts toward the connection's in-flight bound (see the module docstring)."""
        scope = trio.CancelScope()
        if self.disconnected.is_set():
            scope.cancel()
        self._disconnect_scopes.add(scope)
        conn = self._connection
        if conn is not None:
            conn.park(1)
        try:
            with scope:
                yield scope
        finally:
            self._disconnect_scopes.discard(scope)
            if conn is not None:
                conn.park(-1)


def peer_credentials(sock: trio.socket.SocketType | socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer at connect(2) time (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def credentials_allowed(
    creds: tuple[int, int, int], *, euid: int | None = None, egid: int | None = None
) -> bool:
    """The same-user rule of Go's UnixSocketRequireSameUser: uid AND gid must match."""
    _, uid, gid = creds
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    return uid == euid and gid == egid


class _Connection:
    def __init__(self, stream: trio.SocketStream, peer_pid: int) -> None:
        self.stream = stream
        self.peer_pid = peer_pid
        # Used with os.read/os.write only while `disconnected` is not set: close()
        # sets it before the socket (and so this fd number) is released.
        self.fd = stream.socket.fileno()
        # Held while a frame is being written. A Semaphore, not a Lock: a frame
        # begun from the read loop (a plain handler's answer) may be finished by
        # a task, which then releases it.
        self.write_lock = trio.Semaphore(1)
        self.disconnected = trio.Event()
        self.disconnect_scopes: set[trio.CancelScope] = set()  # see cancel_on_disconnect
        # Back-pressure accounting: answers owed (parked ones apart), and the bytes
        # of their requests plus of answer frames not yet written.
        self.in_flight = 0
        self.parked = 0
        self.pending_bytes = 0
        self._room = trio.Event()  # set by release/park when the reader may go on

    @property
    def over_bound(self) -> bool:
        return (
            self.in_flight >= MAX_IN_FLIGHT
            or self.pending_bytes >= MAX_PENDING_BYTES
            or self.in_flight + self.parked >= MAX_OWED
        )

    def acquire(self, nbytes: int) -> None:
        """An answer is owed from now on, for a request of ``nbytes``."""
        self.in_flight += 1
        self.pending_bytes += nbytes

    def release(self, nbytes: int) -> None:
        """That answer was written (or dropped with the connection)."""
        self.in_flight -= 1
        self.pending_bytes -= nbytes
        self._room.set()

    def park(self, delta: int) -> None:
        self.in_flight -= delta
        self.parked += delta
        self._room.set()

    async def wait_for_room(self) -> None:
        """Block the reader while over a bound; return early if the peer is gone."""
        while self.over_bound and not self.disconnected.is_set():
            self._room = trio.Event()
            await self._room.wait()

    def close(self) -> None:
        self.disconnected.set()
        self._room.set()
        for scope in self.disconnect_scopes:
            scope.cancel()
        # Closing the trio socket wakes a task blocked on it with ClosedResourceError.
        self.stream.socket.close()

    async def send(self, frame: bytes) -> None:
        """Write one whole frame; silently drop it once the peer is gone."""
        if self.disconnected.is_set():
            return
        try:
            self.write_lock.acquire_nowait()
        except trio.WouldBlock:
            # Another frame is half-written: queue up, counted as pending.
            self.pending_bytes += len(frame)
            try:
                await self.write_lock.acquire()
            finally:
                self.pending_bytes -= len(frame)
        rest = self._write_held(frame)
        if rest is not None:
            await self._finish(rest)

    def send_nowait(self, frame: bytes) -> Callable[[], Awaitable[None]] | None:
        """Write ``frame`` now, without waiting, if no other frame is half-written.
        None once it is written (or dropped: the peer is gone); otherwise what a
        task must await to finish it."""
        if self.disconnected.is_set():
            return None
        try:
            self.write_lock.acquire_nowait()
        except trio.WouldBlock:
            return functools.partial(self.send, frame)
        rest = self._write_held(frame)
        return None if rest is None else functools.partial(self._finish, rest)

    def _write_held(self, frame: bytes) -> memoryview | None:
        """With ``write_lock`` held: write what the socket takes now. The usual case:
        the socket buffer takes the whole frame in one write(2), with no await (a
        trio send costs a pass of the scheduler). None when the frame is done (the
        lock is released then); otherwise the rest, still under the lock."""
        if self.disconnected.is_set():
            self.write_lock.release()
            return None
        try:
            sent = os.write(self.fd, frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # EPIPE (Python ignores SIGPIPE), ECONNRESET: the peer is gone
            self.close()
            sent = len(frame)
        if sent == len(frame):
            self.write_lock.release()
            return None
        return memoryview(frame)[sent:]

    async def _finish(self, rest: memoryview) -> None:
        """The rest of a frame begun by :meth:`_write_held`; releases ``write_lock``."""
        self.pending_bytes += len(rest)  # the peer is not reading fast enough
        try:
            await self._send_all(rest)
        finally:
            self.pending_bytes -= len(rest)
            self.write_lock.release()

    async def _send_all(self, data: bytes | memoryview) -> None:
        """The rest of a frame, under ``write_lock``."""
        if self.disconnected.is_set():
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close()
        except BaseException:
            # Cancelled mid-frame: the byte stream can no longer be trusted.
            self.close()
            raise


class Server:
    def __init__(self, *, require_same_user: bool = True) -> None:
        self.require_same_user = require_same_user
        self._services: dict[str, dict[str, Method]] = {}
        # Requests being handled or answered; `drained` waits for none.
        self._in_flight = 0
        self._drained = trio.Event()
        self._drained.set()
        self._connections: set[_Connection] = set()

    def connections(self) -> list[dict[str, int]]:
        """The open connections and what each is owed, for introspection."""
        return [
            {
                "peer_pid": c.peer_pid,
                "in_flight": c.in_flight,
                "parked": c.parked,
                "pending_bytes": c.pending_bytes,
            }
            for c in self._connections
        ]

    def register_service(self, name: str, methods: Mapping[str, Method]) -> None:
        if name in self._services:
            raise ValueError(f"service {name} already registered")
        self._services[name] = dict(methods)

    async def drained(self) -> None:
        """Return once every request received so far has been answered (its
        response written to the socket, or dropped with its connection)."""
        while self._in_flight:
            await self._drained.wait()

    async def serve(
        self,
        listener: trio.socket.SocketType | socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve a listening unix socket until cancelled (or the listener is closed)."""
        sock = _as_trio_socket(listener)
        # Handlers outlive their connection; they end only with the server.
        async with trio.open_nursery() as handlers, trio.open_nursery() as conns:
            task_status.started()
            backoff = 0.0
            while True:
                try:
                    conn_sock, _ = await sock.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:
                    if exc.errno in _FATAL_ACCEPT_ERRNOS:
                        raise
                    # EMFILE, ENOBUFS, ECONNABORTED...: wait and retry (Go: 1 ms doubling to 1 s).
                    backoff = min(_BACKOFF_MAX, max(_BACKOFF_MIN, backoff * 2))
                    log.warning("ttrpc: accept error, retrying in %.3fs: %s", backoff, exc)
                    await trio.sleep(backoff)
                    continue
                backoff = 0.0
                conns.start_soon(self._serve_accepted, conn_sock, handlers)

    async def _serve_accepted(self, sock: trio.socket.SocketType, handlers: trio.Nursery) -> None:
        try:
            await self.serve_connection(sock, handler_nursery=handlers)
        except Exception:
            # Never let one connection's failure kill the server.
            log.exception("ttrpc: connection failed")

    async def serve_connection(
        self,
        conn: trio.SocketStream | trio.socket.SocketType | socket.socket,
        *,
        handler_nursery: trio.Nursery | None = None,
    ) -> None:
        """Serve one connected socket until the peer goes away.

        Without ``handler_nursery`` the handlers run in a local nursery, so this
        returns only after the connection ended *and* its handlers finished.
        """
        stream = (
            conn
            if isinstance(conn, trio.SocketStream)
            else trio.SocketStream(_as_trio_socket(conn))
        )
        try:
            try:
                creds = peer_credentials(stream.socket)
            except OSError:
                creds = (0, -1, -1)  # not a unix socket: no credentials to trust
            if self.require_same_user and not credentials_allowed(creds):
                log.warning(
                    "ttrpc: refusing connection after handshake: peer pid=%d uid=%d gid=%d",
                    *creds,
                )
                return
            connection = _Connection(stream, creds[0])
            self._connections.add(connection)
            try:
                if handler_nursery is not None:
                    await self._read_loop(connection, handler_nursery)
                    return
                async with trio.open_nursery() as handlers:
                    await self._read_loop(connection, handlers)
            finally:
                self._connections.discard(connection)
        finally:
            stream.socket.close()  # idempotent; the read loop normally did it already

    async def _read_loop(self, conn: _Connection, handlers: trio.Nursery) -> None:
        decoder = FrameDecoder()
        # read(2) first, wait only when there is nothing: trio's receive_some adds a
        # scheduler pass after every successful read; we yield only when a read
        # found data without waiting (a peer that never pauses must not starve us).
        waited = True
        try:
            while not decoder.at_eof and not conn.disconnected.is_set():
                try:
                    data = os.read(conn.fd, _READ_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(conn.fd)
                    waited = True
                    continue
                except OSError:
                    break  # ECONNRESET: same as EOF
                if not waited:
                    await trio.lowlevel.checkpoint()
                waited = False
                decoder.feed(data)
                while True:
                    if conn.over_bound:
                        # Back-pressure: the rest waits in the decoder (at most one
                        # read), then in the kernel, and the peer's writes block.
                        await conn.wait_for_room()
                        if conn.disconnected.is_set():
                            break
                    event = decoder.next_event()
                    if event is None:
                        break
                    self._on_event(conn, event, handlers)
        except trio.ClosedResourceError:
            pass  # closed by a failed write: same as EOF
        finally:
            # Like Go: the peer went away, so stop and close; handlers keep running.
            conn.close()
        if decoder.pending_bytes:
            log.debug("ttrpc: connection ended inside a frame (%d bytes)", decoder.pending_bytes)

    def _on_event(
        self, conn: _Connection, event: Frame | OversizedFrame, handlers: trio.Nursery
    ) -> None:
        # Replies are written from tasks so the reader never blocks on a write;
        # each is owed like an answer, so a flood of bad frames is bounded too.
        def reply(code: Code, message: str) -> None:
            frame = encode_response(event.stream_id, status=Status(code=code, message=message))
            conn.acquire(0)
            handlers.start_soon(self._reply, conn, frame)

        if isinstance(event, OversizedFrame):
            reply(
                Code.RESOURCE_EXHAUSTED,
                f"message length {event.length} exceed maximum message size of "
                f"{MESSAGE_LENGTH_MAX}",
            )
            return
        if event.type not in (MessageType.REQUEST, MessageType.DATA):
            return  # unknown types are ignored for future compatibility
        if event.stream_id % 2 != 1:
            reply(Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            return
        if event.type == MessageType.DATA:
            # Only unary methods exist here, so no stream is ever open for data.
            reply(Code.INVALID_ARGUMENT, "StreamID is no longer active")
            return
        try:
            req = decode_request(event.data)
        except MalformedMessageError as exc:
            reply(Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return
        cost = len(event.data)
        method = self._services.get(req.service, {}).get(req.method)
        if method is not None and not method.is_async:
            self._answer_now(conn, event.stream_id, req, method, cost, handlers)
            return
        # Counted from here, not when its task first runs: a request read in the
        # same batch as a Shutdown is answered before the daemon exits.
        self._owe(conn, cost)
        handlers.start_soon(self._handle, conn, event.stream_id, req, cost)

    def _owe(self, conn: _Connection, cost: int) -> None:
        """An answer is owed from now on (``drained`` waits for it)."""
        self._in_flight += 1
        if self._drained.is_set():
            self._drained = trio.Event()
        conn.acquire(cost)

    def _paid(self, conn: _Connection, cost: int) -> None:
        """That answer was written, or dropped with its connection."""
        conn.release(cost)
        self._in_flight -= 1
        if not self._in_flight:
            self._drained.set()

    async def _reply(self, conn: _Connection, frame: bytes) -> None:
        try:
            await conn.send(frame)
        finally:
            conn.release(0)

    async def _handle(self, conn: _Connection, stream_id: int, req: Request, cost: int) -> None:
        try:
            await self._handle_one(conn, stream_id, req)
        finally:
            self._paid(conn, cost)

    async def _handle_one(self, conn: _Connection, stream_id: int, req: Request) -> None:
        ctx = self._context(conn, stream_id, req)
        try:
            method, request = self._prepare(req)
            try:
                deadline = math.inf if ctx.deadline is None else ctx.deadline
                with trio.CancelScope(deadline=deadline) as scope:
                    result = await method.handler(request, ctx)  # type: ignore[misc]
                if scope.cancelled_caught:
                    raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
                frame = _response_frame(stream_id, result)
            except Exception as exc:
                raise _failure(req, exc) from None
        except TTRPCError as err:
            frame = _error_frame(stream_id, err)
        await conn.send(frame)

    def _answer_now(
        self,
        conn: _Connection,
        stream_id: int,
        req: Request,
        method: Method,
        cost: int,
        handlers: trio.Nursery,
    ) -> None:
        """A plain handler, run and answered from the read loop. Only a socket that
        does not take the whole answer now leaves a task to finish the write."""
        ctx = self._context(conn, stream_id, req)
        try:
            try:
                result = method.handler(_decode(method, req), ctx)
                frame = _response_frame(stream_id, result)  # type: ignore[arg-type]
            except Exception as exc:
                raise _failure(req, exc) from None
        except TTRPCError as err:
            frame = _error_frame(stream_id, err)
        finish = conn.send_nowait(frame)
        if finish is not None:
            self._owe(conn, cost)
            handlers.start_soon(self._finish_answer, conn, finish, cost)

    async def _finish_answer(
        self, conn: _Connection, finish: Callable[[], Awaitable[None]], cost: int
    ) -> None:
        try:
            await finish()
        finally:
            self._paid(conn, cost)

    @staticmethod
    def _context(conn: _Connection, stream_id: int, req: Request) -> RequestContext:
        metadata: dict[str, list[str]] = {}
        for kv in req.metadata:
            metadata.setdefault(kv.key.lower(), []).append(kv.value)
        deadline = trio.current_time() + req.timeout_nano / 1e9 if req.timeout_nano != 0 else None
        return RequestContext(
            service=req.service,
            method=req.method,
            stream_id=stream_id,
            metadata=metadata,
            deadline=deadline,
            peer_pid=conn.peer_pid,
            disconnected=conn.disconnected,
            _disconnect_scopes=conn.disconnect_scopes,
            _connection=conn,
        )

    def _prepare(self, req: Request) -> tuple[Method, Message]:
        """The method a request names, and its decoded request; or TTRPCError."""
        service = self._services.get(req.service)
        if service is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"service {req.service}")
        method = service.get(req.method)
        if method is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"method {req.method}")
        return method, _decode(method, req)


def _decode(method: Method, req: Request) -> Message:
    try:
        return method.request_type.FromString(req.payload)
    except DecodeError as exc:
        raise TTRPCError(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}") from None


def _response_frame(stream_id: int, result: object) -> bytes:
    if not isinstance(result, Message):
        raise TypeError(f"ttrpc: handler returned {type(result).__name__}, not a message")
    try:
        return encode_response(stream_id, payload=result.SerializeToString())
    except OversizedMessageError as exc:
        # Never emit > 4 MiB: a ttrpc 1.1 containerd would panic on it.
        raise TTRPCError(Code.RESOURCE_EXHAUSTED, str(exc)) from None


def _error_frame(stream_id: int, err: TTRPCError) -> bytes:
    status = err.to_status()
    # A huge error text must not turn into an oversized frame either.
    status.message = status.message[: MESSAGE_LENGTH_MAX // 8]
    return encode_response(stream_id, status=status)


def _failure(req: Request, exc: Exception) -> TTRPCError:
    """What a failed handler answers; a failure that is not a TTRPCError is logged."""
    if not isinstance(exc, TTRPCError):
        log.exception("ttrpc: %s/%s failed", req.service, req.method)
    return error_from_exception(exc)


def _as_trio_socket(sock: trio.socket.SocketType | socket.socket) -> trio.socket.SocketType:
    if isinstance(sock, socket.socket):
        return trio.socket.from_stdlib_socket(sock)
    return sock
