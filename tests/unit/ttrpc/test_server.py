"""Server rules (spec/ttrpc.md §7), each checked over a real unix socket."""

from __future__ import annotations

import errno
import inspect
import logging
import os
import random
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import BytesValue, StringValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shimv2.api.ttrpc.request_pb2 import Request, Response
from shimv2.ttrpc import Code, Method, RequestContext, Server
from shimv2.ttrpc import server as server_mod
from shimv2.ttrpc.server import credentials_allowed, peer_credentials
from shimv2.ttrpc.wire import Frame, FrameDecoder, MessageType, encode_frame, encode_request

from . import helpers
from .helpers import (
    SERVICE,
    TIMEOUT,
    EchoService,
    Peer,
    connected,
    listening,
    make_server,
    served_pair,
)


@pytest.fixture(autouse=True, params=[False, True], ids=["async", "plain"])
def handler_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every test twice: the simple handlers as ``async def`` (each request in its
    own task) and as plain functions (answered from the read loop)."""
    monkeypatch.setattr(helpers, "PLAIN", request.param)
    return bool(request.param)


def assert_status(resp: Response, code: Code, message: str | None = None) -> None:
    assert resp.HasField("status")
    assert resp.status.code == code, resp.status
    assert resp.payload == b""  # the Go client unmarshals payload first
    if message is not None:
        assert resp.status.message == message


async def test_roundtrip_success_omits_status() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        resp = await peer.call(1, "Echo", StringValue(value="hi").SerializeToString())
        assert not resp.HasField("status")
        assert StringValue.FromString(resp.payload).value == "hi"


async def test_empty_ok_response_is_zero_length_frame() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        await peer.request(1, "Empty")
        frame = await peer.frame()
        assert (frame.stream_id, frame.type, frame.flags, frame.data) == (1, 2, 0, b"")


async def test_unknown_service() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        resp = await peer.call(1, "Echo", service="no.such.Service")
        assert_status(resp, Code.UNIMPLEMENTED, "service no.such.Service")
        await peer.echo_ok(3)


async def test_unknown_method() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        resp = await peer.call(1, "Nope")
        assert_status(resp, Code.UNIMPLEMENTED, "method Nope")
        await peer.echo_ok(3)


async def test_same_methods_under_two_service_names() -> None:
    server, svc = make_server()
    server.register_service("test.v2.Echo", svc.methods())
    async with served_pair(server) as peer:
        await peer.echo_ok(1)
        resp = await peer.call(
            3, "Echo", StringValue(value="v2").SerializeToString(), service="test.v2.Echo"
        )
        assert StringValue.FromString(resp.payload).value == "v2"
    with pytest.raises(ValueError):
        server.register_service(SERVICE, {})


async def test_payload_decode_failure_is_internal() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        resp = await peer.call(1, "Echo", b"\xff\xff")
        assert_status(resp, Code.INTERNAL)
        assert resp.status.message.startswith("ttrpc: error unmarshalling payload: ")
        await peer.echo_ok(3)


async def test_garbage_request_is_invalid_argument_and_connection_survives() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        await peer.send(encode_frame(1, MessageType.REQUEST, b"\xff\xff\xff\xff"))
        sid, resp = await peer.response()
        assert sid == 1
        assert_status(resp, Code.INVALID_ARGUMENT)
        assert resp.status.message.startswith("unmarshal request error: ")
        await peer.echo_ok(3)


async def test_even_stream_id() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        resp = await peer.call(2, "Echo")
        assert_status(
            resp, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
        )
        await peer.echo_ok(3)


async def test_oversized_frame_then_next_request_works() -> None:
    server, _ = make_server()
    length = 5 << 20
    async with served_pair(server) as peer, trio.open_nursery() as nursery:
        # Write concurrently: the server must keep reading while we push 5 MiB.
        async def push() -> None:
            await peer.send(struct.pack(">IIBB", length, 5, 1, 0))
            chunk = b"\x00" * (1 << 20)
            for _ in range(5):
                await peer.send(chunk)
            await peer.request(7, "Echo", StringValue(value="after").SerializeToString())

        nursery.start_soon(push)
        # Both are answered by their own tasks, so either may come first.
        got = dict([await peer.response(), await peer.response()])
        assert_status(
            got[5],
            Code.RESOURCE_EXHAUSTED,
            f"message length {length} exceed maximum message size of 4194304",
        )
        assert StringValue.FromString(got[7].payload).value == "after"


async def test_data_frame_is_invalid_argument() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        await peer.send(encode_frame(1, MessageType.DATA, b"abc", 1))
        sid, resp = await peer.response()
        assert sid == 1
        assert_status(resp, Code.INVALID_ARGUMENT)
        await peer.echo_ok(3)


async def test_unknown_frame_types_are_ignored() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        await peer.send(encode_frame(1, 0x7F, b"future"))
        await peer.send(encode_frame(3, MessageType.RESPONSE, b""))
        await peer.send(encode_frame(4, 0x00, b""))
        # The first thing that comes back is the answer to the real request.
        await peer.echo_ok(5)


async def test_out_of_order_responses_and_blocked_handler() -> None:
    server, svc = make_server()
    async with served_pair(server) as peer:
        await peer.request(1, "Block")
        with trio.fail_after(TIMEOUT):
            await svc.block_started.wait()
        # Another request on the same connection is answered while 1 blocks.
        await peer.echo_ok(3)
        await peer.echo_ok(5)
        svc.release.set()
        sid, resp = await peer.response()
        assert sid == 1 and StringValue.FromString(resp.payload).value == "released"


async def test_drained_waits_for_every_answer() -> None:
    """The daemon exits once Shutdown's answer is written, not after a fixed sleep."""
    server, svc = make_server()
    with trio.fail_after(TIMEOUT):
        await server.drained()  # nothing in flight
    async with served_pair(server) as peer:
        await peer.request(1, "Block")
        await svc.block_started.wait()
        drained = trio.Event()

        async def wait_drained() -> None:
            await server.drained()
            drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_drained)
            await peer.echo_ok(3)  # answered while 1 is still in flight
            await trio.sleep(0.01)
            assert not drained.is_set()
            svc.release.set()
            sid, _ = await peer.response()
            assert sid == 1
            with trio.fail_after(TIMEOUT):
                await drained.wait()


async def test_concurrent_responses_are_written_whole() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        ids = list(range(1, 80, 2))
        for sid in ids:
            await peer.request(sid, "Sized", StringValue(value=f"<{sid}>").SerializeToString())
        seen = {}
        for _ in ids:
            sid, resp = await peer.response()
            seen[sid] = BytesValue.FromString(resp.payload).value
        assert seen == {sid: f"<{sid}>".encode() * 20000 for sid in ids}


async def test_handler_exception_is_unknown_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    server, _ = make_server()
    with caplog.at_level(logging.ERROR, logger="shimv2.ttrpc"):
        async with served_pair(server) as peer:
            resp = await peer.call(1, "Fail")
            assert_status(resp, Code.UNKNOWN, "boom")
            await peer.echo_ok(3)
    [record] = [r for r in caplog.records if r.name == "shimv2.ttrpc"]
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])


async def test_handler_os_errors_and_ttrpc_errors() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        resp = await peer.call(1, "Missing")
        assert_status(resp, Code.NOT_FOUND)
        assert "No such file or directory" in resp.status.message
        resp = await peer.call(3, "Typed")
        assert_status(resp, Code.NOT_FOUND, "process does not exist e1: not found")
        resp = await peer.call(5, "None")
        assert_status(resp, Code.UNKNOWN)
        await peer.echo_ok(7)


async def test_oversized_response_becomes_resource_exhausted() -> None:
    server, _ = make_server()
    async with served_pair(server) as peer:
        await peer.request(1, "Big")
        frame = await peer.frame()
        assert len(frame.data) < 1024
        resp = Response.FromString(frame.data)
        assert_status(resp, Code.RESOURCE_EXHAUSTED)
        assert "exceed maximum message size of 4194304" in resp.status.message
        await peer.echo_ok(3)


async def test_timeout_nano_gives_deadline_exceeded() -> None:
    server, svc = make_server()
    async with served_pair(server) as peer:
        before = trio.current_time()
        resp = await peer.call(1, "Sleep", timeout_nano=50_000_000)
        assert_status(resp, Code.DEADLINE_EXCEEDED)
        [ctx] = svc.contexts
        assert ctx.deadline is not None and 0 < ctx.deadline - before < 1
        await peer.echo_ok(3)
        assert svc.contexts[-1].deadline is None  # 0 = no deadline


async def test_request_context_metadata_and_fields() -> None:
    server, svc = make_server()
    async with served_pair(server) as peer:
        await peer.request(
            1,
            "Echo",
            StringValue(value="m").SerializeToString(),
            metadata=[("Containerd-Namespace-TTRPC", "k8s.io"), ("x", "1"), ("X", "2")],
        )
        await peer.response()
    [ctx] = svc.contexts
    assert (ctx.service, ctx.method, ctx.stream_id) == (SERVICE, "Echo", 1)
    assert ctx.metadata == {"containerd-namespace-ttrpc": ["k8s.io"], "x": ["1", "2"]}
    assert ctx.peer_pid == os.getpid()  # socketpair: the creator is the peer


async def test_disconnect_sets_event_handler_finishes_and_server_keeps_serving(
    tmp_path,
) -> None:
    server, svc = make_server()
    async with listening(server, str(tmp_path / "s.sock")) as path:
        async with connected(path) as peer:
            await peer.request(1, "Block")
            with trio.fail_after(TIMEOUT):
                await svc.block_started.wait()
            [ctx] = svc.contexts
            assert not ctx.disconnected.is_set()
        with trio.fail_after(TIMEOUT):
            await ctx.disconnected.wait()
            # Not cancelled: it ran to completion; its answer is discarded.
            await svc.block_finished.wait()
        async with connected(path) as peer2:
            await peer2.echo_ok(1)


async def test_connection_reset_while_handler_blocked(tmp_path) -> None:
    server, svc = make_server()
    async with listening(server, str(tmp_path / "s.sock")) as path:
        async with connected(path) as peer:
            await peer.request(1, "Block")
            with trio.fail_after(TIMEOUT):
                await svc.block_started.wait()
            # SO_LINGER 0 makes close() send a reset instead of a clean EOF.
            linger = struct.pack("ii", 1, 0)
            peer.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        with trio.fail_after(TIMEOUT):
            await svc.contexts[0].disconnected.wait()
            await svc.block_finished.wait()
        async with connected(path) as peer2:
            await peer2.echo_ok(1)


async def test_truncated_frame_then_eof_closes_cleanly(tmp_path) -> None:
    server, _ = make_server()
    async with listening(server, str(tmp_path / "s.sock")) as path:
        async with connected(path) as peer:
            await peer.send(encode_request(1, SERVICE, "Echo", b"")[:7])
            await peer.stream.send_eof()
            with pytest.raises(EOFError):
                await peer.frame()
        async with connected(path) as peer2:
            await peer2.echo_ok(1)


async def test_serve_accepts_a_stdlib_listener(tmp_path) -> None:
    server, _ = make_server()
    path = str(tmp_path / "std.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            async with connected(path) as peer:
                await peer.echo_ok(1)
            nursery.cancel_scope.cancel()


class FlakyListener:
    """A listener whose accept fails a few times like a process out of fds."""

    def __init__(self, sock: trio.socket.SocketType, failures: list[int]) -> None:
        self.sock = sock
        self.failures = failures

    async def accept(self):
        if self.failures:
            await trio.sleep(0)
            err = self.failures.pop(0)
            raise OSError(err, os.strerror(err))
        return await self.sock.accept()


async def test_accept_errors_back_off_and_continue(tmp_path, caplog) -> None:
    server, _ = make_server()
    path = str(tmp_path / "s.sock")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await sock.bind(path)
        sock.listen()
        flaky = FlakyListener(sock, [errno.EMFILE, errno.ENFILE, errno.ECONNABORTED])
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, flaky)
            async with connected(path) as peer:
                await peer.echo_ok(1)
            assert flaky.failures == []
            nursery.cancel_scope.cancel()
    assert sum("accept error" in r.message for r in caplog.records) == 3


async def test_one_failing_connection_does_not_kill_the_server(tmp_path, monkeypatch) -> None:
    server, _ = make_server()
    calls = []
    real = server_mod.peer_credentials

    def flaky_creds(sock):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("unexpected failure in one connection")
        return real(sock)

    monkeypatch.setattr(server_mod, "peer_credentials", flaky_creds)
    async with listening(server, str(tmp_path / "s.sock")) as path:
        async with connected(path) as first:
            with pytest.raises(EOFError):
                await first.frame()
        async with connected(path) as second:
            await second.echo_ok(1)


async def test_listener_closed_ends_serve(tmp_path) -> None:
    server, _ = make_server()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(tmp_path / "s.sock"))
    sock.listen()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, sock)
            sock.close()


# --- back-pressure ----------------------------------------------------------


class Holding(EchoService):
    """Adds calls that wait for ``go``: one counted as in flight, one parked
    (waits inside ``cancel_on_disconnect``, as the shim's Wait does); and
    counts every call it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.go = trio.Event()
        self.calls = 0
        self.held = 0
        self.parked = 0

    async def hold(self, req: Empty, ctx: RequestContext) -> Empty:
        self.held += 1
        await self.go.wait()
        return Empty()

    async def park(self, req: Empty, ctx: RequestContext) -> Empty:
        self.parked += 1
        with ctx.cancel_on_disconnect():
            await self.go.wait()
        return Empty()

    def methods(self) -> dict[str, Method]:
        methods = {
            **super().methods(),
            "Hold": Method(Empty, self.hold),
            "Park": Method(Empty, self.park),
        }
        return {
            name: Method(m.request_type, self._counted(m.handler)) for name, m in methods.items()
        }

    def _counted(self, handler):  # type: ignore[no-untyped-def]
        if not inspect.iscoroutinefunction(handler):

            def counted_now(req, ctx):  # type: ignore[no-untyped-def]
                self.calls += 1
                return handler(req, ctx)

            return counted_now

        async def counted(req, ctx):  # type: ignore[no-untyped-def]
            self.calls += 1
            return await handler(req, ctx)

        return counted


def holding_server() -> tuple[Server, Holding]:
    svc = Holding()
    server, _ = make_server(svc)
    return server, svc


async def settle() -> None:
    """Until every task waits on I/O or an event: the server took all it will take."""
    with trio.fail_after(TIMEOUT):
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)


async def read_all(peer: Peer, count: int) -> dict[int, Response]:
    got: dict[int, Response] = {}
    for _ in range(count):
        sid, resp = await peer.response()
        assert sid not in got
        got[sid] = resp
    return got


@asynccontextmanager
async def sending(peer: Peer, data: bytes) -> AsyncIterator[trio.Event]:
    """Send ``data`` in the background; the event is set once all of it was taken."""
    sent = trio.Event()

    async def send() -> None:
        await peer.send(data)
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        yield sent
        nursery.cancel_scope.cancel()


async def test_reading_stops_at_the_in_flight_bound(monkeypatch) -> None:
    monkeypatch.setattr(server_mod, "MAX_IN_FLIGHT", 4)
    server, svc = holding_server()
    async with served_pair(server) as peer:
        for sid in range(1, 20, 2):
            await peer.request(sid, "Hold")  # all fit in the socket buffer
        await settle()
        assert svc.held == 4  # the other 6 stay unread
        svc.go.set()
        got = await read_all(peer, 10)
        assert sorted(got) == list(range(1, 20, 2))  # nothing accepted is dropped
        assert all(not r.HasField("status") for r in got.values())
        await peer.echo_ok(21)


async def test_parked_requests_do_not_hold_up_others(monkeypatch) -> None:
    monkeypatch.setattr(server_mod, "MAX_IN_FLIGHT", 4)
    server, svc = holding_server()
    async with served_pair(server) as peer:
        for sid in range(1, 40, 2):
            await peer.request(sid, "Park")  # 20 Waits, 5 times the bound
        await peer.echo_ok(41)
        assert svc.parked == 20
        svc.go.set()
        assert sorted(await read_all(peer, 20)) == list(range(1, 40, 2))


async def test_parked_requests_count_toward_the_total_bound(monkeypatch) -> None:
    monkeypatch.setattr(server_mod, "MAX_OWED", 3)
    server, svc = holding_server()
    async with served_pair(server) as peer:
        for sid in range(1, 10, 2):
            await peer.request(sid, "Park")
        await peer.request(11, "Echo", StringValue(value="later").SerializeToString())
        await settle()
        assert svc.parked == 3  # the fourth Wait and the Echo are not read yet
        svc.go.set()
        got = await read_all(peer, 6)
        assert StringValue.FromString(got[11].payload).value == "later"


async def test_a_peer_that_never_reads_is_not_read_and_loses_nothing() -> None:
    server, svc = holding_server()
    count = 5000  # answers of ~0.3 KB: more than the kernel's buffers hold
    payload = StringValue(value="x" * 300).SerializeToString()
    data = b"".join(encode_request(2 * i + 1, SERVICE, "Echo", payload) for i in range(count))
    async with served_pair(server) as peer, sending(peer, data) as sent:
        await settle()
        assert not sent.is_set()  # the server stopped reading: our writes block
        # What it took: answers the kernel's buffers hold, plus the bound.
        assert svc.calls < count
        got = await read_all(peer, count)
        assert sorted(got) == [2 * i + 1 for i in range(count)]
        assert all(r.payload == payload for r in got.values())
        assert sent.is_set()


async def test_unread_large_answers_are_bounded_by_bytes() -> None:
    server, svc = holding_server()
    count = 60  # answers of ~80 KB: 4.8 MB in all, 60 requests fit in the buffer
    async with served_pair(server) as peer:
        for i in range(count):
            value = StringValue(value=f"<{i:02}>").SerializeToString()
            await peer.request(2 * i + 1, "Sized", value)
        await settle()
        # 1 MiB of unwritten answers (13) and the few the kernel holds stop the reader.
        assert svc.calls <= server_mod.MAX_PENDING_BYTES // 80_000 + 8 < count
        seen = {}
        for _ in range(count):
            sid, resp = await peer.response()
            seen[sid] = BytesValue.FromString(resp.payload).value
        assert seen == {2 * i + 1: f"<{i:02}>".encode() * 20000 for i in range(count)}


async def test_a_flood_of_bad_frames_is_bounded_and_answered() -> None:
    server, _ = make_server()
    count = 2000  # 2 MB of frames with even ids, each answered INVALID_ARGUMENT
    data = b"".join(encode_frame(2 * i + 2, MessageType.REQUEST, b"?" * 1000) for i in range(count))
    async with served_pair(server) as peer, sending(peer, data) as sent:
        await settle()
        assert not sent.is_set()
        got = await read_all(peer, count)
        assert sorted(got) == [2 * i + 2 for i in range(count)]
        for resp in got.values():
            assert_status(resp, Code.INVALID_ARGUMENT)
        await peer.echo_ok(1)


async def test_other_connections_answer_while_one_never_reads(tmp_path) -> None:
    server, svc = holding_server()
    payload = StringValue(value="x" * 300).SerializeToString()
    data = b"".join(encode_request(2 * i + 1, SERVICE, "Echo", payload) for i in range(5000))
    async with listening(server, str(tmp_path / "s.sock")) as path:
        async with connected(path) as flood, sending(flood, data) as sent:
            await settle()
            assert not sent.is_set()
            blocked = svc.calls
            async with connected(path) as other:
                for sid in range(1, 200, 2):
                    await other.echo_ok(sid)
            assert svc.calls == blocked + 100  # the flood was not read meanwhile
        async with connected(path) as after:  # the flooder left: all is well
            await after.echo_ok(1)


# --- peer credentials -------------------------------------------------------


def test_credentials_check_function() -> None:
    uid, gid = os.geteuid(), os.getegid()
    assert credentials_allowed((1, uid, gid))
    assert not credentials_allowed((1, uid + 1, gid))
    assert not credentials_allowed((1, uid, gid + 1))
    assert credentials_allowed((1, 1000, 1000), euid=1000, egid=1000)
    assert not credentials_allowed((1, 1000, 0), euid=1000, egid=1000)


def test_peer_credentials_of_socketpair() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.geteuid(), os.getegid())


CHILD = r"""
import os, socket, sys
os.setresgid({gid}, {gid}, {gid})
os.setgroups([])
os.setresuid({uid}, {uid}, {uid})
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1].encode("latin-1").replace(b"@", b"\0", 1))
s.settimeout(5)
data = b""
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) >= 10 + int.from_bytes(data[:4], "big"):
            break
except (ConnectionResetError, BrokenPipeError):
    pass  # closing with our request unread makes the kernel send a reset
sys.stdout.write(data.hex())
"""


async def run_child_as(addr: bytes, uid: int, gid: int) -> bytes:
    request = encode_request(1, SERVICE, "Echo", StringValue(value="x").SerializeToString())
    proc = await trio.run_process(
        [
            sys.executable,
            "-c",
            CHILD.format(uid=uid, gid=gid),
            addr.replace(b"\0", b"@").decode(),
            request.hex(),
        ],
        capture_stdout=True,
    )
    return bytes.fromhex(proc.stdout.decode())


@asynccontextmanager
async def abstract_listener(server: Server) -> AsyncIterator[bytes]:
    """An abstract-namespace listener: no filesystem permissions get in the way."""
    addr = b"\0pyshim-ttrpc-test-%d-%d" % (os.getpid(), random.getrandbits(32))
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await sock.bind(addr)
        sock.listen()
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, sock)
            yield addr
            nursery.cancel_scope.cancel()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")


@needs_root
@pytest.mark.parametrize(("uid", "gid"), [(65534, 65534), (0, 65534), (65534, 0)])
async def test_peer_with_other_user_is_refused(uid: int, gid: int, caplog) -> None:
    server, svc = make_server()
    async with abstract_listener(server) as addr:
        with trio.fail_after(TIMEOUT):
            data = await run_child_as(addr, uid, gid)
        assert data == b""  # closed without a single byte written
        assert svc.contexts == []
        # The refusal does not affect the server: a same-user peer is served.
        async with connected(addr) as peer:
            await peer.echo_ok(1)
    assert any("refusing connection" in r.message for r in caplog.records)


@needs_root
async def test_other_user_is_served_when_not_required() -> None:
    server, _ = make_server(require_same_user=False)
    async with abstract_listener(server) as addr:
        with trio.fail_after(TIMEOUT):
            data = await run_child_as(addr, 65534, 65534)
    [frame] = decode_frames(data)
    resp = Response.FromString(frame.data)
    assert StringValue.FromString(resp.payload).value == "x"


def decode_frames(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.feed(data)
    out = []
    while (event := decoder.next_event()) is not None:
        assert isinstance(event, Frame)
        out.append(event)
    return out


# --- fuzz -----------------------------------------------------------------

fuzz_frames = st.lists(
    st.tuples(
        st.integers(0, 0xFFFFFFFE),  # stream id; 0xFFFFFFFF is the test's sentinel
        st.sampled_from([0, 1, 2, 3, 4, 0x7F, 0xFF]),  # type
        st.integers(0, 255),  # flags
        st.one_of(
            st.binary(max_size=200),
            # Valid-looking requests with random names and payloads.
            st.builds(
                lambda svc, m, p, t: Request(
                    service=svc, method=m, payload=p, timeout_nano=t
                ).SerializeToString(),
                st.sampled_from([SERVICE, "x", ""]),
                st.sampled_from(["Echo", "Empty", "Fail", "Missing", "Typed", "None", "?"]),
                st.binary(max_size=20),
                st.integers(-(2**63), 2**63 - 1),
            ),
        ),
    ),
    max_size=15,
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=fuzz_frames)
async def test_fuzz_server_survives_any_well_framed_input(frames) -> None:
    server, _ = make_server()
    # Blocking handlers would never answer; random input must not reach them.
    server._services[SERVICE].pop("Block")
    server._services[SERVICE].pop("Sleep")
    async with served_pair(server) as peer:
        data = b"".join(encode_frame(sid, t, d, f) for sid, t, f, d in frames)
        sentinel = 0xFFFFFFFF  # odd, and larger than anything else
        await peer.send(data)
        await peer.request(sentinel, "Echo", StringValue(value="alive").SerializeToString())
        while True:
            sid, resp = await peer.response()
            if sid == sentinel and not resp.HasField("status"):
                assert StringValue.FromString(resp.payload).value == "alive"
                break


async def test_cancel_on_disconnect_ends_a_blocked_handler(tmp_path) -> None:
    # How the shim's Wait blocks: no watcher task, the connection cancels the scope.
    seen: list[RequestContext] = []
    ended = trio.Event()

    async def wait_like(req: Empty, ctx: RequestContext) -> Empty:
        seen.append(ctx)
        with ctx.cancel_on_disconnect() as scope:
            await trio.sleep_forever()
        assert scope.cancelled_caught
        ended.set()
        return Empty()

    svc = EchoService()
    server = Server()
    server.register_service(SERVICE, {**svc.methods(), "WaitLike": Method(Empty, wait_like)})
    async with listening(server, str(tmp_path / "s.sock")) as path:
        async with connected(path) as peer:
            await peer.request(1, "WaitLike")
            await peer.echo_ok(3)  # the blocked call does not stall others
            assert len(seen) == 1
        with trio.fail_after(TIMEOUT):
            await ended.wait()
        # Entered after the connection ended: cancelled at once.
        with trio.fail_after(TIMEOUT), seen[0].cancel_on_disconnect() as scope:
            await trio.sleep_forever()
        assert scope.cancelled_caught
        async with connected(path) as peer2:
            await peer2.echo_ok(1)
