"""A hostile client on a running pyshim's ttrpc socket (issue 13).

Garbage, oversized and truncated frames, unknown services and methods, bad
payloads, even and zero stream ids, 200 connections at once, 2,000 pipelined
requests and a client that never reads its answers. After each the shim still
answers State with the same pid, the container's output still flows and the
shim holds no more fds than before. Well-formed frames come from the project's
own wire helpers; everything is bounded and stays on the unix socket.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.api.ttrpc.request_pb2 import Response
from shimv2.ttrpc import Code
from shimv2.ttrpc.wire import (
    MESSAGE_LENGTH_MAX,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
    encode_request,
)

from .harness import RUNNING, Containerd, wait_until

pytestmark = pytest.mark.e2e

PYSHIM = "io.containerd.pyshim.v2"
TASK = "containerd.task.v2.Task"
TIMEOUT = 20.0
# A shell loop printing a counter: output that must keep flowing.
COUNTER = "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.05; done"


@dataclass
class Target:
    c: Containerd
    cid: str
    socket: str
    shim: int
    pid: int
    log: Path


@pytest.fixture(scope="module")
def target(_module_containerd: Containerd, rootfs: Path, tmp_path_factory) -> Iterator[Target]:
    c = _module_containerd
    cid = c.new_id(prefix="hostile")
    log = tmp_path_factory.mktemp("hostile") / "out.log"
    c.ctr(
        "run", "-d", "--runtime", PYSHIM, "--log-uri", f"file://{log}",
        "--rootfs", str(rootfs), cid, "/bin/sh", "-c", COUNTER,
        check=True,
    )  # fmt: skip
    try:
        c.wait_task_status(cid, {RUNNING}, timeout=10)
        [shim] = c.shim_processes(cid)
        pid = c.task_pid(cid)
        assert pid
        yield Target(c, cid, str(c.shim_socket_path(cid)), shim.pid, pid, log)
    finally:
        with contextlib.suppress(Exception):
            c.ctr("task", "kill", "-s", "SIGKILL", cid, timeout=10)
            wait_until(lambda: c.task_status(cid) != RUNNING, timeout=10, what="task stopped")
        c.ctr("task", "rm", "-f", cid, timeout=15)
        c.ctr("container", "rm", cid, timeout=15)


# --------------------------------------------------------------------------- a raw peer


class Peer:
    """One blocking connection to the shim, speaking raw frames."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.decoder = FrameDecoder()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, stream_id: int, method: str, payload: bytes, service: str = TASK) -> None:
        self.send(encode_request(stream_id, service, method, payload))

    def response(self) -> tuple[int, Response]:
        while (event := self.decoder.next_event()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the shim closed the connection")
            self.decoder.feed(data)
        assert isinstance(event, Frame) and event.type == MessageType.RESPONSE
        return event.stream_id, Response.FromString(event.data)

    def responses(self, count: int) -> dict[int, Response]:
        got: dict[int, Response] = {}
        for _ in range(count):
            sid, resp = self.response()
            assert sid not in got, f"two answers for stream {sid}"
            got[sid] = resp
        return got


@contextlib.contextmanager
def peer(t: Target) -> Iterator[Peer]:
    p = Peer(t.socket)
    try:
        yield p
    finally:
        p.close()


def state_request(t: Target) -> bytes:
    return api.StateRequest(id=t.cid).SerializeToString()


def assert_state(t: Target, resp: Response) -> None:
    assert not resp.HasField("status") or resp.status.code == Code.OK, resp.status
    state = api.StateResponse.FromString(resp.payload)
    assert (state.id, state.pid) == (t.cid, t.pid)


def assert_code(resp: Response, code: Code) -> None:
    assert resp.HasField("status") and resp.status.code == code, resp
    assert resp.payload == b""


def state_on(p: Peer, t: Target, stream_id: int) -> None:
    p.request(stream_id, "State", state_request(t))
    sid, resp = p.response()
    assert sid == stream_id
    assert_state(t, resp)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def log_size(t: Target) -> int:
    try:
        return t.log.stat().st_size
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def unharmed(t: Target) -> Iterator[None]:
    """The shim survives the block: same pid over State, output flowing, no fd leak."""
    before = fds(t.shim)
    yield
    with peer(t) as p:
        state_on(p, t, 1)
    size = log_size(t)
    wait_until(lambda: log_size(t) > size, timeout=TIMEOUT, what="container output flowing")
    # The shim closes its side of our connections asynchronously: wait for it.
    wait_until(lambda: fds(t.shim) <= before, timeout=TIMEOUT, what=f"shim fds back to {before}")
    assert t.c.task_status(t.cid) == RUNNING


# --------------------------------------------------------------------------- the abuse


def test_garbage(target: Target) -> None:
    with unharmed(target):
        garbage = [
            b"GET / HTTP/1.1\r\nHost: shim\r\n\r\n",  # announces a 1.2 GB frame
            bytes(range(256)) * 64,
            b"\xff" * 4096,
            b"\x00" * 4096,  # zero-length frames of type 0: ignored
        ]
        for data in garbage:
            with peer(target) as p:
                p.send(data)
        with peer(target) as p:  # well-framed garbage: answered, connection kept
            p.send(encode_frame(1, MessageType.REQUEST, b"\xff\xfe\xfd" * 100))
            sid, resp = p.response()
            assert sid == 1
            assert_code(resp, Code.INVALID_ARGUMENT)
            p.send(encode_frame(3, 0x7F, b"from the future"))  # unknown type: ignored
            p.send(encode_frame(5, MessageType.DATA, b"data", 1))  # no stream open
            sid, resp = p.response()
            assert sid == 5
            assert_code(resp, Code.INVALID_ARGUMENT)
            state_on(p, target, 7)


def test_oversized_frame(target: Target) -> None:
    with unharmed(target), peer(target) as p:
        length = MESSAGE_LENGTH_MAX + (1 << 20)
        p.send(struct.pack(">IIBB", length, 1, MessageType.REQUEST, 0))
        chunk = b"\x00" * (1 << 20)
        for _ in range(length >> 20):
            p.send(chunk)
        p.request(3, "State", state_request(target))
        got = p.responses(2)
        assert_code(got[1], Code.RESOURCE_EXHAUSTED)
        assert_state(target, got[3])


def test_truncated_frame_held_open(target: Target) -> None:
    with unharmed(target):
        whole = encode_request(1, TASK, "State", state_request(target))
        with peer(target) as head, peer(target) as body:
            head.send(whole[:7])  # inside the header
            body.send(whole[:-5])  # inside the data
            with peer(target) as other:  # others are served meanwhile
                state_on(other, target, 1)
            body.send(whole[-5:])  # the rest arrives late: still answered
            sid, resp = body.response()
            assert sid == 1
            assert_state(target, resp)


def test_unknown_services_and_methods(target: Target) -> None:
    with unharmed(target), peer(target) as p:
        p.request(1, "State", state_request(target), service="no.such.Service")
        p.request(3, "NoSuchMethod", b"")
        p.request(5, "State", state_request(target), service="")
        got = p.responses(3)
        for sid in (1, 3, 5):
            assert_code(got[sid], Code.UNIMPLEMENTED)
        state_on(p, target, 7)


def test_bad_payloads(target: Target) -> None:
    with unharmed(target), peer(target) as p:
        p.request(1, "State", b"\xff\xff\xff")  # not a StateRequest
        p.request(3, "State", api.StateRequest(id="no-such-container").SerializeToString())
        p.request(5, "Kill", api.KillRequest(id=target.cid, exec_id="nope").SerializeToString())
        got = p.responses(3)
        assert_code(got[1], Code.INTERNAL)
        assert_code(got[3], Code.NOT_FOUND)
        assert_code(got[5], Code.NOT_FOUND)
        state_on(p, target, 7)


def test_even_and_zero_stream_ids(target: Target) -> None:
    with unharmed(target), peer(target) as p:
        for sid in (0, 2, 0xFFFFFFFE):
            p.request(sid, "State", state_request(target))
        got = p.responses(3)
        for sid in (0, 2, 0xFFFFFFFE):
            assert_code(got[sid], Code.INVALID_ARGUMENT)
        state_on(p, target, 1)


def test_200_connections_at_once(target: Target) -> None:
    with unharmed(target):
        socks: list[socket.socket] = []
        try:
            for _ in range(200):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                socks.append(s)
                s.connect(target.socket)  # EAGAIN if the listen backlog were full
            request = encode_request(1, TASK, "State", state_request(target))
            for s in socks:
                s.setblocking(True)
                s.settimeout(TIMEOUT)
                s.sendall(request)
            for s in socks:
                decoder = FrameDecoder()
                while (event := decoder.next_event()) is None:
                    data = s.recv(1 << 16)
                    assert data, "closed without an answer"
                    decoder.feed(data)
                assert isinstance(event, Frame) and event.stream_id == 1
                assert_state(target, Response.FromString(event.data))
        finally:
            for s in socks:
                s.close()


def test_2000_pipelined_requests(target: Target) -> None:
    with unharmed(target), peer(target) as p:
        ids = [2 * i + 1 for i in range(2000)]
        payload = state_request(target)
        p.send(b"".join(encode_request(sid, TASK, "State", payload) for sid in ids))
        got = p.responses(len(ids))
        assert sorted(got) == ids
        for resp in got.values():
            assert_state(target, resp)


def test_a_client_that_never_reads(target: Target) -> None:
    with unharmed(target):
        rss_before = rss(target.shim)
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flood.connect(target.socket)
        flood.setblocking(False)
        try:
            request = encode_request(1, TASK, "State", state_request(target))
            sent, limit = 0, 64 << 20  # bounded: 64 MiB of requests at most
            while sent < limit:
                try:
                    sent += flood.send(request * 256)
                except BlockingIOError:
                    # Not writable for 2 s: the shim stopped reading us.
                    _, writable, _ = select.select([], [flood], [], 2.0)
                    if not writable:
                        break
            assert sent < limit, "the shim kept reading a client that never reads"
            grown = rss(target.shim) - rss_before
            assert grown < 16 << 20, f"the shim grew by {grown >> 20} MiB"
            for _ in range(3):  # others are served while the flood sits there
                with peer(target) as other:
                    state_on(other, target, 1)
        finally:
            flood.close()


def test_everything_again_on_one_shim(target: Target) -> None:
    """The shim pid never changed across all of the above (no restart by containerd)."""
    [shim] = target.c.shim_processes(target.cid)
    assert shim.pid == target.shim
    assert target.c.task_pid(target.cid) == target.pid
