"""The Task service end to end, in-process, with a fake runc (spec: task-api.md, events.md).

Why a forked child: the fake runc's ``create`` forks the container process and
exits, like runc. The container process is then re-parented to the nearest
*child subreaper*, which is what lets the shim's :class:`Reaper` see its exit.
The pytest process must not become a subreaper itself, so every test here runs
its scenario through :func:`fakes.run_in_subreaper`: a forked child calls
``prctl(PR_SET_CHILD_SUBREAPER)`` and then ``trio.run``s the scenario, which
sets up, all inside that child:

* a :class:`Reaper` task;
* a fake containerd events server (``Events/Forward``) on a temporary socket,
  decoding and collecting every event, and a :class:`Publisher` pointed at it;
* a ``TaskService`` served by a ttrpc :class:`Server` under both
  ``containerd.task.v2.Task`` and ``containerd.task.v3.Task``;
* a ttrpc client, used like containerd uses the shim.

Assertions run in the child; a failure comes back as an AssertionError with the
child's traceback. The child runs in its own process group, which is SIGKILLed
afterwards, so no container process outlives a test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from fakes import install_fake_runc, read_records, run_in_subreaper, subcommands
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from shimv2 import bundle as bundlefiles
from shimv2 import container as container_module
from shimv2.api.containerd.events import task_pb2 as events
from shimv2.api.containerd.runc.options import oci_pb2
from shimv2.api.containerd.services.events.ttrpc.v1 import events_pb2
from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.api.containerd.types.task import task_pb2 as tasktypes
from shimv2.events import EVENTS_SERVICE, Publisher
from shimv2.process import ZERO_TIME_NS
from shimv2.reaper import Reaper
from shimv2.service import TASK_SERVICES, TaskService
from shimv2.ttrpc import Code, Method, RequestContext, Server, TTRPCError, connect

V2, V3 = "containerd.task.v2.Task", "containerd.task.v3.Task"
NS = "unitns"
TIMEOUT = 10
ZERO_SECONDS = -62135596800

RESPONSES: dict[str, type[Message]] = {
    "Create": api.CreateTaskResponse,
    "Start": api.StartResponse,
    "Delete": api.DeleteResponse,
    "State": api.StateResponse,
    "Wait": api.WaitResponse,
    "Kill": empty_pb2.Empty,
    "Pids": api.PidsResponse,
    "Connect": api.ConnectResponse,
    "Shutdown": empty_pb2.Empty,
    "Exec": empty_pb2.Empty,
    "CloseIO": empty_pb2.Empty,
    "ResizePty": empty_pb2.Empty,
}


class Events:
    """containerd's side of Forward: decoded events, in arrival order."""

    def __init__(self) -> None:
        self.received: list[tuple[str, Message, events_pb2.Envelope]] = []
        self.on_exit: Callable[[Message], None] | None = None
        self._changed = trio.Event()

    async def forward(self, req: events_pb2.ForwardRequest, ctx: RequestContext) -> empty_pb2.Empty:
        envelope = req.envelope
        assert envelope.namespace == NS
        assert ctx.metadata.get("containerd-namespace-ttrpc") == [NS]
        assert envelope.timestamp.ToNanoseconds() > 0
        name = envelope.event.type_url
        assert name.startswith("containerd.events."), name  # bare, no googleapis prefix
        message = getattr(events, name.rsplit(".", 1)[1]).FromString(envelope.event.value)
        if envelope.topic == "/tasks/exit" and self.on_exit is not None:
            self.on_exit(message)
        self.received.append((envelope.topic, message, envelope))
        self._changed.set()
        self._changed = trio.Event()
        return empty_pb2.Empty()

    def topics(self) -> list[str]:
        return [topic for topic, _, _ in self.received]

    def of(self, topic: str) -> list[Any]:
        return [message for t, message, _ in self.received if t == topic]

    async def wait_for(self, predicate: Callable[[list[str]], bool]) -> None:
        with trio.fail_after(TIMEOUT):
            while not predicate(self.topics()):
                await self._changed.wait()

    async def wait_count(self, topic: str, count: int = 1) -> None:
        await self.wait_for(lambda topics: topics.count(topic) >= count)


class Shim:
    def __init__(self, base: Path, client: Any, service: TaskService, ev: Events) -> None:
        self.base = base
        self.client = client
        self.service = service
        self.events = ev
        self.shutdown_requested = trio.Event()
        self.runc = base / "bin" / "runc"
        self.runc_root = base / "runc-root"
        self.record = base / "runc-record.jsonl"

    # -- calls ----------------------------------------------------------------

    async def call(self, method: str, req: Message, service: str = V2) -> Any:
        with trio.fail_after(TIMEOUT):
            return await self.client.call(service, method, req, RESPONSES[method])

    async def error(self, method: str, req: Message, service: str = V2) -> TTRPCError:
        try:
            response = await self.call(method, req, service)
        except TTRPCError as exc:
            return exc
        raise AssertionError(f"{method} succeeded unexpectedly: {response}")

    async def expect(
        self, method: str, req: Message, code: Code, message: str | None = None
    ) -> None:
        err = await self.error(method, req)
        assert err.code == code, (method, err)
        if message is not None:
            assert err.message == message, (method, err.message)

    # -- fixtures -------------------------------------------------------------

    def bundle(self, cid: str, args: list[str], *, own_pid_ns: bool = True) -> str:
        bundle = self.base / "bundles" / cid
        bundle.mkdir(parents=True)
        (bundle / "rootfs").mkdir()
        spec: dict[str, Any] = {
            "ociVersion": "1.0.2",
            "process": {"args": args, "env": [f"PATH={os.environ['PATH']}"], "cwd": "/"},
            "linux": {"namespaces": [{"type": "mount"}]},
        }
        if own_pid_ns:
            spec["linux"]["namespaces"].append({"type": "pid"})
        (bundle / "config.json").write_text(json.dumps(spec))
        return str(bundle)

    def fifo(self, name: str) -> str:
        path = self.base / "fifos" / name
        path.parent.mkdir(exist_ok=True)
        os.mkfifo(path, 0o700)
        return str(path)

    def reader(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def options(self) -> any_pb2.Any:
        opts = oci_pb2.Options(binary_name=str(self.runc), root=str(self.runc_root))
        return any_pb2.Any(type_url="containerd.runc.v1.Options", value=opts.SerializeToString())

    def create_request(self, cid: str, args: list[str], **kw: Any) -> api.CreateTaskRequest:
        own_pid_ns = kw.pop("own_pid_ns", True)
        bundle = kw.pop("bundle", None) or self.bundle(cid, args, own_pid_ns=own_pid_ns)
        return api.CreateTaskRequest(id=cid, bundle=bundle, options=self.options(), **kw)

    async def create(self, cid: str, args: list[str], **kw: Any) -> int:
        response = await self.call("Create", self.create_request(cid, args, **kw))
        assert response.pid > 0
        return response.pid

    async def run(self, cid: str, args: list[str], **kw: Any) -> int:
        pid = await self.create(cid, args, **kw)
        assert (await self.call("Start", api.StartRequest(id=cid))).pid == pid
        return pid

    async def state(self, cid: str, exec_id: str = "", service: str = V2) -> api.StateResponse:
        return await self.call("State", api.StateRequest(id=cid, exec_id=exec_id), service)

    async def kill_and_delete(self, cid: str) -> api.DeleteResponse:
        try:
            await self.call("Kill", api.KillRequest(id=cid, signal=signal.SIGKILL))
        except TTRPCError as exc:
            assert exc.code == Code.NOT_FOUND, exc
        await self.call("Wait", api.WaitRequest(id=cid))
        return await self.call("Delete", api.DeleteRequest(id=cid))

    def runc_calls(self) -> list[list[str]]:
        return subcommands(read_records(self.record))


def read_available(fd: int) -> tuple[bytes, bool]:
    """Everything readable now from a FIFO, and whether its writers are all gone (EOF)."""
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks), False
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


async def read_until(fd: int, expected: bytes) -> bytes:
    got = b""
    with trio.fail_after(TIMEOUT):
        while not got.startswith(expected):
            data, eof = read_available(fd)
            got += data
            if eof and not data:
                break
            await trio.sleep(0.01)
    return got


@asynccontextmanager
async def shim_env(base: Path) -> AsyncIterator[Shim]:
    install_fake_runc(base / "bin")
    os.environ["FAKE_RUNC_RECORD"] = str(base / "runc-record.jsonl")
    ev = Events()
    events_server = Server()
    events_server.register_service(
        EVENTS_SERVICE, {"Forward": Method(events_pb2.ForwardRequest, ev.forward)}
    )
    async with trio.open_nursery() as nursery:
        events_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await events_sock.bind(str(base / "e.sock"))
        events_sock.listen(16)
        await nursery.start(events_server.serve, events_sock)

        reaper = Reaper()
        await nursery.start(reaper.run)
        publisher = Publisher(str(base / "e.sock"), NS)
        nursery.start_soon(publisher.run)
        shutdown = trio.Event()
        service = TaskService(
            namespace=NS,
            reaper=reaper,
            publisher=publisher,
            nursery=nursery,
            on_shutdown=shutdown.set,
        )
        task_server = Server()
        for name in TASK_SERVICES:
            task_server.register_service(name, service.methods())
        assert set(TASK_SERVICES) == {V2, V3}
        task_sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await task_sock.bind(str(base / "t.sock"))
        task_sock.listen(16)
        await nursery.start(task_server.serve, task_sock)
        async with connect(str(base / "t.sock")) as client:
            shim = Shim(base, client, service, ev)
            shim.shutdown_requested = shutdown
            yield shim
            # Every event still queued reaches the fake containerd.
            with trio.fail_after(TIMEOUT):
                assert await publisher.flush(TIMEOUT)
        nursery.cancel_scope.cancel()


Scenario = Callable[[Shim], Awaitable[Any]]


async def _main(scenario: Scenario, base: str) -> Any:
    async with shim_env(Path(base)) as shim:
        return await scenario(shim)


def run(tmp_path: Path, scenario: Scenario) -> Any:
    return run_in_subreaper(_main, scenario, str(tmp_path), timeout=60)


def ts_ns(ts: Any) -> int:
    return ts.ToNanoseconds()


# -- scenarios ------------------------------------------------------------------


async def _lifecycle(shim: Shim) -> None:
    stdout, stderr = shim.fifo("c1-stdout"), shim.fifo("c1-stderr")
    out_r, err_r = shim.reader(stdout), shim.reader(stderr)
    args = ["sh", "-c", "echo hello; echo oops >&2; exec sleep 60"]
    req = shim.create_request("c1", args, stdout=stdout, stderr=stderr)
    created = await shim.call("Create", req)
    pid = created.pid
    assert pid > 0
    connected = await shim.call("Connect", api.ConnectRequest(id="c1"))
    assert (connected.shim_pid, connected.task_pid) == (os.getpid(), pid)

    state = await shim.state("c1")
    assert (state.id, state.bundle, state.pid) == ("c1", req.bundle, pid)
    assert state.status == tasktypes.CREATED
    assert (state.stdout, state.stderr, state.stdin) == (stdout, stderr, "")
    assert state.exited_at.seconds == ZERO_SECONDS and state.exited_at.nanos == 0

    assert (await shim.call("Start", api.StartRequest(id="c1"))).pid == pid
    for service in (V2, V3):
        state = await shim.state("c1", service=service)
        assert (state.status, state.pid) == (tasktypes.RUNNING, pid)
    assert await read_until(out_r, b"hello\n") == b"hello\n"
    assert await read_until(err_r, b"oops\n") == b"oops\n"

    await shim.call("Kill", api.KillRequest(id="c1", signal=signal.SIGTERM))
    waited = await shim.call("Wait", api.WaitRequest(id="c1"))
    assert waited.exit_status == 128 + signal.SIGTERM
    assert abs(ts_ns(waited.exited_at) - time.time_ns()) < 10 * 10**9

    state = await shim.state("c1")
    assert (state.status, state.exit_status) == (tasktypes.STOPPED, 143)
    assert state.exited_at == waited.exited_at
    assert bundlefiles.read_exit(req.bundle) == bundlefiles.ExitRecord(
        pid, 143, ts_ns(waited.exited_at)
    )
    # The output FIFOs were closed once the container's side hit EOF.
    assert read_available(out_r) == (b"", True)
    assert read_available(err_r) == (b"", True)

    deleted = await shim.call("Delete", api.DeleteRequest(id="c1"))
    assert (deleted.pid, deleted.exit_status) == (pid, 143)
    assert deleted.exited_at == waited.exited_at
    await shim.expect("State", api.StateRequest(id="c1"), Code.NOT_FOUND)
    # An empty shim asked to Connect: containerd reloading a shim whose task it
    # lost. Not found (so containerd cleans up), and the shim stops.
    assert not shim.shutdown_requested.is_set()
    await shim.expect("Connect", api.ConnectRequest(id="c1"), Code.NOT_FOUND)
    assert shim.shutdown_requested.is_set()

    await shim.events.wait_count("/tasks/delete")
    assert shim.events.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    [create] = shim.events.of("/tasks/create")
    assert (create.container_id, create.bundle, create.pid) == ("c1", req.bundle, pid)
    assert (create.io.stdout, create.io.stderr, create.io.stdin) == (stdout, stderr, "")
    [start] = shim.events.of("/tasks/start")
    assert (start.container_id, start.pid) == ("c1", pid)
    [exit_] = shim.events.of("/tasks/exit")
    assert (exit_.container_id, exit_.id, exit_.pid, exit_.exit_status) == ("c1", "c1", pid, 143)
    assert exit_.exited_at == waited.exited_at
    [delete] = shim.events.of("/tasks/delete")
    assert (delete.container_id, delete.pid, delete.exit_status) == ("c1", pid, 143)
    assert delete.exited_at == waited.exited_at
    assert delete.id == ""

    root = f"{shim.runc_root}/{NS}"
    records = read_records(shim.record)
    assert all(
        r["argv"][:6] == ["--root", root, "--log", f"{req.bundle}/log.json", "--log-format", "json"]
        for r in records
    )
    assert shim.runc_calls() == [
        ["create", "--bundle", req.bundle, "--pid-file", f"{req.bundle}/init.pid", "c1"],
        ["start", "c1"],
        ["kill", "c1", "15"],
        ["delete", "c1"],
    ]
    assert json.loads(Path(req.bundle, "options.json").read_text()) == {
        "binary_name": str(shim.runc),
        "root": str(shim.runc_root),
    }
    os.close(out_r)
    os.close(err_r)


def test_lifecycle_and_events(tmp_path: Path) -> None:
    run(tmp_path, _lifecycle)


async def _v3_service(shim: Shim) -> None:
    req = shim.create_request("c1", ["sleep", "60"])
    pid = (await shim.call("Create", req, service=V3)).pid
    assert (await shim.call("Start", api.StartRequest(id="c1"), service=V3)).pid == pid
    assert (await shim.state("c1", service=V2)).status == tasktypes.RUNNING
    await shim.call("Kill", api.KillRequest(id="c1", signal=9), service=V3)
    assert (await shim.call("Wait", api.WaitRequest(id="c1"), service=V3)).exit_status == 137
    await shim.call("Delete", api.DeleteRequest(id="c1"), service=V3)


def test_task_v3_service_has_the_same_handlers(tmp_path: Path) -> None:
    run(tmp_path, _v3_service)


async def _validation(shim: Shim) -> None:
    good_bundle = shim.bundle("good", ["sleep", "60"])
    for bad_id in ["../x", "", "a/b", "x" * 77, "-a", "a..b", "a b"]:
        req = api.CreateTaskRequest(id=bad_id, bundle=good_bundle, options=shim.options())
        await shim.expect("Create", req, Code.INVALID_ARGUMENT)
    no_config = shim.base / "bundles" / "no-config"
    no_config.mkdir(parents=True)
    for bundle in [str(no_config), "relative/bundle", str(shim.base / "missing")]:
        req = api.CreateTaskRequest(id="c2", bundle=bundle, options=shim.options())
        await shim.expect("Create", req, Code.INVALID_ARGUMENT)
    bad_options = api.CreateTaskRequest(
        id="c2",
        bundle=good_bundle,
        options=any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\xff"),
    )
    await shim.expect("Create", bad_options, Code.INVALID_ARGUMENT)
    assert shim.runc_calls() == []  # nothing reached runc

    await shim.create("c1", [], bundle=good_bundle)
    await shim.expect(
        "Create",
        api.CreateTaskRequest(id="c1", bundle=good_bundle, options=shim.options()),
        Code.ALREADY_EXISTS,
        "container c1: already exists",
    )

    not_created = "container not created: not found"
    calls: list[tuple[str, Message]] = [
        ("State", api.StateRequest(id="nope")),
        ("Start", api.StartRequest(id="nope")),
        ("Wait", api.WaitRequest(id="nope")),
        ("Kill", api.KillRequest(id="nope", signal=9)),
        ("Delete", api.DeleteRequest(id="nope")),
        ("Pids", api.PidsRequest(id="nope")),
        ("CloseIO", api.CloseIORequest(id="nope", stdin=True)),
        ("ResizePty", api.ResizePtyRequest(id="nope", width=80, height=24)),
        ("Exec", api.ExecProcessRequest(id="nope", exec_id="e1")),
    ]
    for method, call in calls:
        await shim.expect(method, call, Code.NOT_FOUND, not_created)
    unknown_exec = "process does not exist e9: not found"
    calls = [
        ("State", api.StateRequest(id="c1", exec_id="e9")),
        ("Start", api.StartRequest(id="c1", exec_id="e9")),
        ("Wait", api.WaitRequest(id="c1", exec_id="e9")),
        ("Kill", api.KillRequest(id="c1", exec_id="e9", signal=9)),
        ("Delete", api.DeleteRequest(id="c1", exec_id="e9")),
        ("CloseIO", api.CloseIORequest(id="c1", exec_id="e9", stdin=True)),
    ]
    for method, call in calls:
        await shim.expect(method, call, Code.NOT_FOUND, unknown_exec)
    # Connect never fails: an unknown id is task_pid 0.
    connected = await shim.call("Connect", api.ConnectRequest(id="nope"))
    assert (connected.shim_pid, connected.task_pid) == (os.getpid(), 0)
    for exec_id in ["", "../e", "a/b"]:
        await shim.expect(
            "Exec",
            api.ExecProcessRequest(id="c1", exec_id=exec_id, spec=exec_spec(["true"])),
            Code.INVALID_ARGUMENT,
        )
    for value in [b"not json", b"[]", b"{}", b'{"args": []}']:
        spec = any_pb2.Any(type_url=PROCESS_TYPE, value=value)
        await shim.expect(
            "Exec", api.ExecProcessRequest(id="c1", exec_id="e1", spec=spec), Code.INVALID_ARGUMENT
        )
    # A created (never started) container can be deleted.
    await shim.call("Delete", api.DeleteRequest(id="c1"))
    await shim.expect("State", api.StateRequest(id="c1"), Code.NOT_FOUND)


def test_validation_and_not_found_errors(tmp_path: Path) -> None:
    run(tmp_path, _validation)


async def _create_failure(shim: Shim) -> None:
    stdout = shim.fifo("out")
    out_r = shim.reader(stdout)
    os.environ["FAKE_RUNC_FAIL"] = "create"
    req = shim.create_request("c1", ["sleep", "60"], stdout=stdout)
    await shim.expect("Create", req, Code.UNKNOWN, "OCI runtime create failed: fake create failure")
    # Nothing is left registered or open.
    await shim.expect("State", api.StateRequest(id="c1"), Code.NOT_FOUND)
    assert read_available(out_r) == (b"", True)  # the shim's FIFO fd is closed again
    assert shim.service.containers == {}
    await shim.call("Shutdown", api.ShutdownRequest(id="c1"))
    assert shim.shutdown_requested.is_set()

    del os.environ["FAKE_RUNC_FAIL"]
    # The same id works now (no stdout this time: Delete of a created container
    # waits up to 2 s for output that a never-started process cannot close).
    response = await shim.call(
        "Create", api.CreateTaskRequest(id="c1", bundle=req.bundle, options=req.options)
    )
    assert response.pid > 0
    await shim.call("Delete", api.DeleteRequest(id="c1"))
    await shim.events.wait_count("/tasks/delete")
    assert shim.events.topics()[0] == "/tasks/create"
    assert len(shim.events.of("/tasks/create")) == 1
    os.close(out_r)


def test_create_failure_leaves_nothing_registered(tmp_path: Path) -> None:
    run(tmp_path, _create_failure)


async def _start_failure(shim: Shim) -> None:
    await shim.create("c1", ["sleep", "60"])
    os.environ["FAKE_RUNC_FAIL"] = "start"
    await shim.expect(
        "Start",
        api.StartRequest(id="c1"),
        Code.UNKNOWN,
        "OCI runtime start failed: fake start failure",
    )
    del os.environ["FAKE_RUNC_FAIL"]
    assert (await shim.state("c1")).status == tasktypes.CREATED
    await shim.call("Start", api.StartRequest(id="c1"))
    await shim.expect(
        "Start", api.StartRequest(id="c1"), Code.UNKNOWN, "cannot start a running process"
    )
    await shim.kill_and_delete("c1")
    assert "/tasks/start" in shim.events.topics()


def test_start_failure_and_double_start(tmp_path: Path) -> None:
    run(tmp_path, _start_failure)


async def _kill_and_delete_errors(shim: Shim) -> None:
    pid = await shim.run("c1", ["sleep", "60"])
    await shim.expect(
        "Delete", api.DeleteRequest(id="c1"), Code.UNKNOWN, "cannot delete a running process"
    )
    await shim.call("Kill", api.KillRequest(id="c1", signal=signal.SIGKILL))
    assert (await shim.call("Wait", api.WaitRequest(id="c1"))).exit_status == 137
    # runc says "container not running": for containerd that is "already dead".
    await shim.expect(
        "Kill",
        api.KillRequest(id="c1", signal=signal.SIGKILL),
        Code.NOT_FOUND,
        "process already finished: not found",
    )
    deleted = await shim.call("Delete", api.DeleteRequest(id="c1"))
    assert (deleted.pid, deleted.exit_status) == (pid, 137)
    for method, req in [
        ("Kill", api.KillRequest(id="c1", signal=9)),
        ("Delete", api.DeleteRequest(id="c1")),
        ("Wait", api.WaitRequest(id="c1")),
        ("State", api.StateRequest(id="c1")),
    ]:
        await shim.expect(method, req, Code.NOT_FOUND, "container not created: not found")


def test_kill_stopped_is_not_found_and_delete_running_is_refused(tmp_path: Path) -> None:
    run(tmp_path, _kill_and_delete_errors)


async def _exit_during_start(shim: Shim) -> None:
    # The fake `runc start` returns only after the container process exited.
    os.environ["FAKE_RUNC_START_WAIT_EXIT"] = "1"
    pid = await shim.create("c1", ["sh", "-c", "exit 7"])
    assert (await shim.call("Start", api.StartRequest(id="c1"))).pid == pid
    del os.environ["FAKE_RUNC_START_WAIT_EXIT"]
    waited = await shim.call("Wait", api.WaitRequest(id="c1"))
    assert waited.exit_status == 7
    await shim.events.wait_count("/tasks/exit")
    assert shim.events.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    [exit_] = shim.events.of("/tasks/exit")
    assert (exit_.id, exit_.pid, exit_.exit_status) == ("c1", pid, 7)
    state = await shim.state("c1")
    assert (state.status, state.exit_status) == (tasktypes.STOPPED, 7)
    await shim.call("Delete", api.DeleteRequest(id="c1"))


def test_exit_during_runc_start_still_publishes_start_first(tmp_path: Path) -> None:
    run(tmp_path, _exit_during_start)


async def _exit_before_start(shim: Shim) -> None:
    # A created container killed before Start: its exit is reported too.
    pid = await shim.create("c1", ["sleep", "60"])
    await shim.call("Kill", api.KillRequest(id="c1", signal=signal.SIGKILL))
    waited = await shim.call("Wait", api.WaitRequest(id="c1"))
    assert waited.exit_status == 137
    await shim.events.wait_count("/tasks/exit")
    [exit_] = shim.events.of("/tasks/exit")
    assert (exit_.id, exit_.pid) == ("c1", pid)
    await shim.call("Delete", api.DeleteRequest(id="c1"))


def test_kill_of_a_created_container(tmp_path: Path) -> None:
    run(tmp_path, _exit_before_start)


async def _wait_does_not_block(shim: Shim) -> None:
    await shim.run("c1", ["sleep", "60"])
    result: list[api.WaitResponse] = []

    async def waiter() -> None:
        result.append(await shim.call("Wait", api.WaitRequest(id="c1")))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(waiter)  # three blocking Waits on the same connection
        await trio.sleep(0.1)
        with trio.fail_after(5):
            for _ in range(5):
                assert (await shim.state("c1")).status == tasktypes.RUNNING
                await shim.call("Connect", api.ConnectRequest(id="c1"))
            pids = await shim.call("Pids", api.PidsRequest(id="c1"))
            assert len(pids.processes) == 1
        assert result == []
        await shim.call("Kill", api.KillRequest(id="c1", signal=signal.SIGTERM))
    assert [r.exit_status for r in result] == [143, 143, 143]
    await shim.call("Delete", api.DeleteRequest(id="c1"))


def test_wait_does_not_block_other_calls_on_the_connection(tmp_path: Path) -> None:
    run(tmp_path, _wait_does_not_block)


PROCESS_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def exec_spec(args: list[str]) -> any_pb2.Any:
    process = {"args": args, "env": [f"PATH={os.environ['PATH']}"], "cwd": "/", "terminal": True}
    return any_pb2.Any(type_url=PROCESS_TYPE, value=json.dumps(process).encode())


async def _exec(shim: Shim) -> None:
    init_pid = await shim.run("c1", ["sleep", "60"])
    stdout = shim.fifo("e1-stdout")
    out_r = shim.reader(stdout)
    spec = exec_spec(["sh", "-c", "echo exec-out; exit 5"])
    exec_req = api.ExecProcessRequest(id="c1", exec_id="e1", stdout=stdout, spec=spec)
    await shim.call("Exec", exec_req)
    state = await shim.state("c1", "e1")
    assert (state.id, state.status, state.pid) == ("e1", tasktypes.CREATED, 0)
    await shim.expect(
        "Kill",
        api.KillRequest(id="c1", exec_id="e1", signal=9),
        Code.FAILED_PRECONDITION,
        "process not created: failed precondition",
    )
    started = await shim.call("Start", api.StartRequest(id="c1", exec_id="e1"))
    assert started.pid > 0 and started.pid != init_pid
    waited = await shim.call("Wait", api.WaitRequest(id="c1", exec_id="e1"))
    assert waited.exit_status == 5
    assert await read_until(out_r, b"exec-out\n") == b"exec-out\n"
    state = await shim.state("c1", "e1")
    assert (state.status, state.exit_status, state.pid) == (tasktypes.STOPPED, 5, started.pid)
    assert (state.stdout, state.exec_id) == (stdout, "e1")
    assert (await shim.state("c1")).status == tasktypes.RUNNING  # the init is unaffected

    await shim.expect("Exec", exec_req, Code.ALREADY_EXISTS, "id e1: already exists")
    await shim.expect(
        "Start",
        api.StartRequest(id="c1", exec_id="e1"),
        Code.UNKNOWN,
        "cannot start a stopped process",
    )
    await shim.expect(
        "Kill",
        api.KillRequest(id="c1", exec_id="e1", signal=9),
        Code.NOT_FOUND,
        "process already finished: not found",
    )
    pid_file = Path(shim.base / "bundles" / "c1" / "e1.pid")
    assert pid_file.read_text() == str(started.pid)
    deleted = await shim.call("Delete", api.DeleteRequest(id="c1", exec_id="e1"))
    assert (deleted.pid, deleted.exit_status) == (started.pid, 5)
    assert deleted.exited_at == waited.exited_at
    assert not pid_file.exists()
    await shim.expect(
        "State",
        api.StateRequest(id="c1", exec_id="e1"),
        Code.NOT_FOUND,
        "process does not exist e1: not found",
    )
    await shim.call("Exec", exec_req)  # the id is free again
    await shim.call("Delete", api.DeleteRequest(id="c1", exec_id="e1"))  # a created exec

    await shim.events.wait_count("/tasks/exit")
    topics = shim.events.topics()
    assert topics == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/exec-added",
    ]
    [added, _] = shim.events.of("/tasks/exec-added")
    assert (added.container_id, added.exec_id) == ("c1", "e1")
    [exec_started] = shim.events.of("/tasks/exec-started")
    assert (exec_started.container_id, exec_started.exec_id, exec_started.pid) == (
        "c1",
        "e1",
        started.pid,
    )
    [exit_] = shim.events.of("/tasks/exit")
    assert (exit_.container_id, exit_.id, exit_.pid, exit_.exit_status) == (
        "c1",
        "e1",
        started.pid,
        5,
    )
    assert exit_.exited_at == waited.exited_at
    exec_calls = [c for c in shim.runc_calls() if c[0] == "exec"]
    assert len(exec_calls) == 1
    call = exec_calls[0]
    assert call[:2] == ["exec", "--process"]
    assert call[3:] == ["--detach", "--pid-file", str(pid_file), "c1"]
    [record] = [r for r in read_records(shim.record) if "process" in r]
    assert record["process"]["args"] == ["sh", "-c", "echo exec-out; exit 5"]
    assert record["process"]["terminal"] is False  # forced to the request's value
    assert not os.path.exists(call[2])  # the process file is removed afterwards
    await shim.kill_and_delete("c1")
    os.close(out_r)


def test_exec_lifecycle_and_events(tmp_path: Path) -> None:
    run(tmp_path, _exec)


async def _exec_after_init_exit(shim: Shim) -> None:
    await shim.create("c1", ["sh", "-c", "exit 0"])
    await shim.call(
        "Exec", api.ExecProcessRequest(id="c1", exec_id="e1", spec=exec_spec(["true"]))
    )  # allowed while created
    await shim.call("Start", api.StartRequest(id="c1"))
    assert (await shim.call("Wait", api.WaitRequest(id="c1"))).exit_status == 0
    await shim.expect(
        "Start",
        api.StartRequest(id="c1", exec_id="e1"),
        Code.FAILED_PRECONDITION,
        "container c1 init process is not running: failed precondition",
    )
    await shim.expect(
        "Exec",
        api.ExecProcessRequest(id="c1", exec_id="e2", spec=exec_spec(["true"])),
        Code.UNKNOWN,
        "cannot exec in a stopped state",
    )
    assert not [c for c in shim.runc_calls() if c[0] == "exec"]
    await shim.call("Delete", api.DeleteRequest(id="c1"))


def test_exec_start_after_init_exit_is_refused(tmp_path: Path) -> None:
    run(tmp_path, _exec_after_init_exit)


async def _close_io_before_exec_start(shim: Shim) -> None:
    await shim.run("c1", ["sleep", "60"])
    stdin, stdout = shim.fifo("e1-stdin"), shim.fifo("e1-stdout")
    out_r = shim.reader(stdout)
    # The client's writer has written its input and gone away; a reader of our
    # own keeps the FIFO's buffer alive meanwhile.
    hold = shim.reader(stdin)
    writer = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
    os.write(writer, b"piped input\n")
    os.close(writer)
    exec_req = api.ExecProcessRequest(
        id="c1", exec_id="e1", stdin=stdin, stdout=stdout, spec=exec_spec(["cat"])
    )
    await shim.call("Exec", exec_req)
    # ctr task exec: CloseIO arrives before (or during) Start.
    await shim.call("CloseIO", api.CloseIORequest(id="c1", exec_id="e1", stdin=True))
    await shim.call("Start", api.StartRequest(id="c1", exec_id="e1"))
    # cat only exits if its stdin reaches EOF: the keep-alive was released.
    waited = await shim.call("Wait", api.WaitRequest(id="c1", exec_id="e1"))
    assert waited.exit_status == 0
    assert await read_until(out_r, b"piped input\n") == b"piped input\n"
    await shim.call("Delete", api.DeleteRequest(id="c1", exec_id="e1"))
    await shim.kill_and_delete("c1")
    os.close(hold)
    os.close(out_r)


def test_close_io_before_exec_start(tmp_path: Path) -> None:
    run(tmp_path, _close_io_before_exec_start)


async def _close_io_of_the_init(shim: Shim) -> None:
    stdin, stdout = shim.fifo("stdin"), shim.fifo("stdout")
    out_r = shim.reader(stdout)
    req = shim.create_request("c1", ["cat"], stdin=stdin, stdout=stdout)
    await shim.call("Create", req)
    await shim.call("Start", api.StartRequest(id="c1"))
    writer = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)  # the shim holds a reader
    os.write(writer, b"line 1\n")
    assert await read_until(out_r, b"line 1\n") == b"line 1\n"
    os.close(writer)  # the client detaches: no EOF for the container yet
    await trio.sleep(0.2)
    assert (await shim.state("c1")).status == tasktypes.RUNNING
    await shim.call("CloseIO", api.CloseIORequest(id="c1", stdin=True))
    assert (await shim.call("Wait", api.WaitRequest(id="c1"))).exit_status == 0
    await shim.call("Delete", api.DeleteRequest(id="c1"))
    os.close(out_r)


def test_stdin_keep_alive_until_close_io(tmp_path: Path) -> None:
    run(tmp_path, _close_io_of_the_init)


async def _pids(shim: Shim) -> None:
    init_pid = await shim.run("c1", ["sleep", "60"])
    await shim.call(
        "Exec", api.ExecProcessRequest(id="c1", exec_id="e1", spec=exec_spec(["sleep", "60"]))
    )
    exec_pid = (await shim.call("Start", api.StartRequest(id="c1", exec_id="e1"))).pid
    response = await shim.call("Pids", api.PidsRequest(id="c1"))
    by_pid = {p.pid: p for p in response.processes}
    assert set(by_pid) == {init_pid, exec_pid}
    assert not by_pid[init_pid].HasField("info")
    info = by_pid[exec_pid].info
    assert info.type_url == "containerd.runc.v1.ProcessDetails"
    assert oci_pb2.ProcessDetails.FromString(info.value).exec_id == "e1"
    await shim.call("Kill", api.KillRequest(id="c1", exec_id="e1", signal=signal.SIGKILL))
    assert (await shim.call("Wait", api.WaitRequest(id="c1", exec_id="e1"))).exit_status == 137
    await shim.call("Delete", api.DeleteRequest(id="c1", exec_id="e1"))
    await shim.kill_and_delete("c1")


def test_pids_attach_process_details_for_execs(tmp_path: Path) -> None:
    run(tmp_path, _pids)


async def _pids_failure(shim: Shim) -> None:
    # A failing `runc ps` must not make containerd >= 1.7 take the shim for a
    # leaked one on reload (it deletes it, container and all): the init is listed.
    init_pid = await shim.run("c1", ["sleep", "60"])
    os.environ["FAKE_RUNC_FAIL"] = "ps"
    response = await shim.call("Pids", api.PidsRequest(id="c1"))
    del os.environ["FAKE_RUNC_FAIL"]
    assert [p.pid for p in response.processes] == [init_pid]
    await shim.kill_and_delete("c1")


def test_pids_runc_failure(tmp_path: Path) -> None:
    run(tmp_path, _pids_failure)


async def _pids_of_a_stopped_task(shim: Shim) -> None:
    # containerd >= 1.7 deletes a reloaded shim whose Pids is empty: a stopped
    # init that was not deleted yet must still be listed, or its exit is lost.
    init_pid = await shim.run("c1", ["sh", "-c", "exit 42"])
    assert (await shim.call("Wait", api.WaitRequest(id="c1"))).exit_status == 42
    response = await shim.call("Pids", api.PidsRequest(id="c1"))
    assert [p.pid for p in response.processes] == [init_pid]
    os.environ["FAKE_RUNC_FAIL"] = "ps"  # runc's ps of a stopped container may fail
    response = await shim.call("Pids", api.PidsRequest(id="c1"))
    del os.environ["FAKE_RUNC_FAIL"]
    assert [p.pid for p in response.processes] == [init_pid]
    await shim.call("Delete", api.DeleteRequest(id="c1"))
    await shim.expect("Pids", api.PidsRequest(id="c1"), Code.NOT_FOUND)


def test_pids_lists_a_stopped_init_until_it_is_deleted(tmp_path: Path) -> None:
    run(tmp_path, _pids_of_a_stopped_task)


async def _shutdown(shim: Shim) -> None:
    await shim.run("c1", ["sleep", "60"])
    await shim.call("Shutdown", api.ShutdownRequest(id="c1"))
    await shim.call("Shutdown", api.ShutdownRequest(id="c1", now=True), service=V3)
    await trio.sleep(0.05)
    assert not shim.shutdown_requested.is_set()  # a container is still there
    await shim.kill_and_delete("c1")
    await shim.call("Shutdown", api.ShutdownRequest(id="c1"))
    assert shim.shutdown_requested.is_set()


def test_shutdown_only_without_containers(tmp_path: Path) -> None:
    run(tmp_path, _shutdown)


SEQ_5000 = "".join(f"{i}\n" for i in range(1, 5001)).encode()


async def _output_before_exit(shim: Shim) -> dict[str, Any]:
    stdout, stderr = shim.fifo("out"), shim.fifo("err")
    readers = {"stdout": shim.reader(stdout), "stderr": shim.reader(stderr)}
    got = {name: bytearray() for name in readers}
    snapshot: dict[str, Any] = {}

    async def read(name: str) -> None:  # as ctr's copy loops do, until EOF
        fd = readers[name]
        while True:
            data, eof = read_available(fd)
            got[name] += data
            if eof:
                return
            await trio.lowlevel.wait_readable(fd)

    def on_exit(message: Message) -> None:
        # Runs when /tasks/exit reaches "containerd": an attached ctr closes its
        # FIFOs right then, so its readers must already have had every byte (and
        # nothing is left in the FIFO), and the shim has closed the FIFOs.
        for name, fd in readers.items():
            snapshot[name] = (bytes(got[name]), *read_available(fd))

    shim.events.on_exit = on_exit
    await shim.run(
        "c1", ["sh", "-c", "seq 1 5000; echo bye >&2; exit 3"], stdout=stdout, stderr=stderr
    )
    async with trio.open_nursery() as nursery:
        for name in readers:  # now that the shim has the FIFOs open: no early EOF
            nursery.start_soon(read, name)
        assert (await shim.call("Wait", api.WaitRequest(id="c1"))).exit_status == 3
        await shim.events.wait_count("/tasks/exit")
    await shim.call("Delete", api.DeleteRequest(id="c1"))
    for fd in readers.values():
        os.close(fd)
    return snapshot


def test_the_reader_has_all_output_before_the_exit_event(tmp_path: Path) -> None:
    snapshot = run(tmp_path, _output_before_exit)
    assert snapshot["stdout"] == (SEQ_5000, b"", True)
    assert snapshot["stderr"] == (b"bye\n", b"", True)


async def _unread_output(shim: Shim, *, reader_stays: bool) -> bytes:
    stdout = shim.fifo("out")
    reader = shim.reader(stdout)
    await shim.run("c1", ["sh", "-c", "seq 1 5000; exit 3"], stdout=stdout)
    if not reader_stays:
        os.close(reader)  # the client goes away (ctr run -d) without reading a byte
    assert (await shim.call("Wait", api.WaitRequest(id="c1"))).exit_status == 3
    # The exit did not wait for the reader; the output waits in the FIFO until Delete.
    if not reader_stays:
        reader = shim.reader(stdout)
    output = await read_until(reader, SEQ_5000)
    with trio.fail_after(TIMEOUT):
        while not read_available(reader)[1]:  # then EOF: the shim closed the FIFO
            await trio.sleep(0.01)
    os.close(reader)
    await shim.call("Delete", api.DeleteRequest(id="c1"))
    return output


async def _reader_that_takes_nothing(shim: Shim) -> bytes:
    container_module.IO_FLUSH_TIMEOUT = 0.2  # this shim only: the exit waits this long
    return await _unread_output(shim, reader_stays=True)


async def _reader_gone(shim: Shim) -> bytes:
    container_module.IO_FLUSH_TIMEOUT = 3600.0  # no reader: the exit must not wait for it
    return await _unread_output(shim, reader_stays=False)


@pytest.mark.parametrize("scenario", [_reader_that_takes_nothing, _reader_gone])
def test_a_reader_that_takes_nothing_does_not_hold_the_exit_and_loses_nothing(
    tmp_path: Path, scenario: Scenario
) -> None:
    assert run(tmp_path, scenario) == SEQ_5000


async def _orphan_keeps_writing(shim: Shim) -> bytes:
    container_module.IO_FLUSH_TIMEOUT = 0.2  # this shim only; the cap is not under test
    stdout = shim.fifo("out")
    stop = shim.base / "stop"
    script = f"(while [ ! -e {stop} ]; do echo x; sleep 0.01; done; echo end) & exit 3"
    await shim.run("c1", ["sh", "-c", script], stdout=stdout)
    reader = shim.reader(stdout)
    got = bytearray()

    async def read() -> None:
        while True:
            data, eof = read_available(reader)
            got.extend(data)
            if eof:
                return
            await trio.lowlevel.wait_readable(reader)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        # The output keeps moving and its reader keeps taking it, but it has no
        # end: the exit is not held back for it.
        assert (await shim.call("Wait", api.WaitRequest(id="c1"))).exit_status == 3
        stop.touch()
    os.close(reader)
    await shim.call("Delete", api.DeleteRequest(id="c1"))
    return bytes(got)


def test_an_orphan_that_keeps_writing_does_not_hold_the_exit(tmp_path: Path) -> None:
    output = run(tmp_path, _orphan_keeps_writing)
    assert output.endswith(b"x\nend\n")


async def _kill_all_without_pid_namespace(shim: Shim) -> None:
    await shim.run("c1", ["sh", "-c", "exit 0"], own_pid_ns=False)
    await shim.call("Wait", api.WaitRequest(id="c1"))
    await shim.call("Delete", api.DeleteRequest(id="c1"))
    await shim.run("c2", ["sh", "-c", "exit 0"], own_pid_ns=True)
    await shim.call("Wait", api.WaitRequest(id="c2"))
    await shim.call("Delete", api.DeleteRequest(id="c2"))
    calls = shim.runc_calls()
    # Without its own PID namespace nothing else kills the init's descendants.
    assert ["kill", "--all", "c1", "9"] in calls
    assert ["kill", "--all", "c2", "9"] not in calls
    assert calls.index(["kill", "--all", "c1", "9"]) < calls.index(["delete", "c1"])


def test_kill_all_after_init_exit_without_own_pid_namespace(tmp_path: Path) -> None:
    run(tmp_path, _kill_all_without_pid_namespace)


async def _delete_created(shim: Shim) -> None:
    await shim.create("c1", ["sleep", "60"])
    waits: list[api.WaitResponse] = []

    async def waiter() -> None:
        waits.append(await shim.call("Wait", api.WaitRequest(id="c1")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.05)
        await shim.call("Delete", api.DeleteRequest(id="c1"))
    assert len(waits) == 1  # a Wait on a never-started container is released
    await shim.events.wait_count("/tasks/delete")
    assert shim.events.topics()[-1] == "/tasks/delete"
    [delete] = shim.events.of("/tasks/delete")
    assert delete.container_id == "c1"
    assert delete.HasField("exited_at")


def test_delete_of_a_created_container_releases_waiters(tmp_path: Path) -> None:
    run(tmp_path, _delete_created)


async def _exited_at_zero_time_everywhere(shim: Shim) -> None:
    await shim.run("c1", ["sleep", "60"])
    state = await shim.state("c1")
    assert (state.exited_at.seconds, state.exited_at.nanos) == (ZERO_SECONDS, 0)
    assert ts_ns(state.exited_at) == ZERO_TIME_NS
    await shim.kill_and_delete("c1")


def test_running_state_reports_go_zero_time(tmp_path: Path) -> None:
    run(tmp_path, _exited_at_zero_time_everywhere)


async def _init_exit_waits_for_execs(shim: Shim) -> None:
    # The init exits as soon as the exec runs; the exec would run until `release`
    # exists, but (like runc kill --all, which the fake cannot do for a stopped
    # container) the shim kills it when the init exits.
    started, release = shim.base / "exec-started", shim.base / "release"
    go = shim.base / "go"  # the exec lets the init exit only after our checks on it
    wait_for = "while [ ! -e {0} ]; do sleep 0.01; done"
    init_pid = await shim.run("c1", ["sh", "-c", wait_for.format(started) + "; exit 1"])
    exec_script = f"{wait_for.format(go)}; touch {started}; " + wait_for.format(release)
    await shim.call(
        "Exec",
        api.ExecProcessRequest(id="c1", exec_id="e1", spec=exec_spec(["sh", "-c", exec_script])),
    )
    exec_pid = (await shim.call("Start", api.StartRequest(id="c1", exec_id="e1"))).pid
    await shim.expect(
        "Delete",
        api.DeleteRequest(id="c1", exec_id="e1"),
        Code.UNKNOWN,
        "cannot delete a running process",
    )
    await shim.call("ResizePty", api.ResizePtyRequest(id="c1", exec_id="e1", width=80, height=24))
    go.touch()
    with trio.fail_after(TIMEOUT):
        while not started.exists():
            await trio.sleep(0.01)
    init_wait = await shim.call("Wait", api.WaitRequest(id="c1"))
    assert init_wait.exit_status == 1
    assert not release.exists()
    exec_state = await shim.state("c1", "e1")
    # The init's exit was held back until the running exec's exit was handled.
    assert (exec_state.status, exec_state.exit_status) == (tasktypes.STOPPED, 137)
    await shim.events.wait_count("/tasks/exit", 2)
    exits = [(e.id, e.pid) for e in shim.events.of("/tasks/exit")]
    assert exits == [("e1", exec_pid), ("c1", init_pid)]
    await shim.expect(
        "ResizePty",
        api.ResizePtyRequest(id="c1", exec_id="e1", width=80, height=24),
        Code.UNKNOWN,
        "cannot resize a stopped container",
    )
    await shim.call("Delete", api.DeleteRequest(id="c1", exec_id="e1"))
    await shim.call("Delete", api.DeleteRequest(id="c1"))


def test_init_exit_is_published_after_running_execs(tmp_path: Path) -> None:
    run(tmp_path, _init_exit_waits_for_execs)


# -- races the Go shim's per-process lock prevents (known bugs, see reasons) --------


async def _concurrent(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    results: list[Any] = []

    async def one(call: Callable[[], Awaitable[Any]]) -> None:
        try:
            results.append(("ok", await call()))
        except TTRPCError as exc:
            results.append((exc.code, exc.message))

    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(one, call)
    return results


async def _concurrent_delete(shim: Shim) -> None:
    await shim.run("c1", ["sh", "-c", "exit 2"])
    await shim.call("Wait", api.WaitRequest(id="c1"))
    delete = api.DeleteRequest(id="c1")
    results = await _concurrent([lambda: shim.call("Delete", delete)] * 2)
    codes = sorted(str(r[0]) for r in results)
    # One Delete wins; the other must be NOT_FOUND (containerd tolerates that),
    # not UNKNOWN with a KeyError text.
    assert codes == sorted(["ok", str(Code.NOT_FOUND)]), results


def test_concurrent_delete_of_the_init(tmp_path: Path) -> None:
    run(tmp_path, _concurrent_delete)


async def _concurrent_exec_start(shim: Shim) -> None:
    await shim.run("c1", ["sleep", "60"])
    await shim.call(
        "Exec", api.ExecProcessRequest(id="c1", exec_id="e1", spec=exec_spec(["sleep", "0.3"]))
    )
    start = api.StartRequest(id="c1", exec_id="e1")
    results = await _concurrent([lambda: shim.call("Start", start)] * 2)
    await shim.call("Wait", api.WaitRequest(id="c1", exec_id="e1"))
    await trio.sleep(0.5)
    runc_execs = [c for c in shim.runc_calls() if c[0] == "exec"]
    assert len(runc_execs) == 1, results  # one exec id, one process
    assert shim.events.topics().count("/tasks/exec-started") == 1
    await shim.kill_and_delete("c1")


def test_concurrent_start_of_an_exec_runs_it_once(tmp_path: Path) -> None:
    run(tmp_path, _concurrent_exec_start)


async def _concurrent_init_start(shim: Shim) -> None:
    await shim.create("c1", ["sh", "-c", "sleep 0.3; exit 2"])
    start = api.StartRequest(id="c1")
    results = await _concurrent([lambda: shim.call("Start", start)] * 2)
    assert sorted(str(r[0]) for r in results) == sorted(["ok", str(Code.UNKNOWN)]), results
    await shim.call("Wait", api.WaitRequest(id="c1"))
    await trio.sleep(0.3)
    assert shim.events.topics().count("/tasks/exit") == 1, shim.events.topics()
    await shim.call("Delete", api.DeleteRequest(id="c1"))


def test_concurrent_start_of_the_init_publishes_one_exit(tmp_path: Path) -> None:
    run(tmp_path, _concurrent_init_start)


@pytest.mark.parametrize("terminal", [False, True])
def test_process_file_for_runc_exec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    from shimv2.container import exec_process_file

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    spec = json.dumps({"args": ["/bin/true"], "cwd": "/", "terminal": False}).encode()
    with exec_process_file(spec, terminal) as path:
        assert os.path.dirname(path) == str(tmp_path)
        assert os.stat(path).st_mode & 0o777 == 0o600
        with open(path) as f:
            written = json.load(f)
        assert written == {"args": ["/bin/true"], "cwd": "/", "terminal": terminal}
    assert not os.path.exists(path)
