"""Every Task request decoder and handler, fed random bytes through the real ttrpc
server and TaskService (with the fake runc): each call gets an answer (a message
or a ttrpc error), never a crash or a dropped connection, and the shim keeps
serving a real container afterwards."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import trio
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_service import TIMEOUT, Shim, run

from shimv2.api.containerd.task.v2 import shim_pb2 as api
from shimv2.ttrpc import TTRPCError

# Every RPC of containerd.task.v2.Task, with its response type, from the proto itself.
RESPONSES = {
    m.name: GetMessageClass(m.output_type) for m in api.DESCRIPTOR.services_by_name["Task"].methods
}
METHODS = sorted(RESPONSES)


async def _fuzz(shim: Shim, calls: list[tuple[str, bytes]]) -> None:
    pid = await shim.run("keep", ["sleep", "60"])
    for method, payload in calls:
        # Raw payload bytes, exactly as a peer could send them.
        with trio.fail_after(TIMEOUT), contextlib.suppress(TTRPCError):
            await shim.client.call(
                "containerd.task.v2.Task", method, _Raw(payload), RESPONSES[method]
            )
    state = await shim.state("keep")
    assert (state.pid, state.status) == (pid, 2)  # untouched and still served
    await shim.kill_and_delete("keep")


class _Raw:
    """A request message that serializes to the given bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def SerializeToString(self) -> bytes:
        return self._data

    def ByteSize(self) -> int:
        return len(self._data)


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(calls=st.lists(st.tuples(st.sampled_from(METHODS), st.binary(max_size=64)), min_size=40))
def test_random_requests_never_break_the_shim(tmp_path_factory: Any, calls: list[Any]) -> None:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    run(tmp, lambda shim: _fuzz(shim, calls))


def test_every_task_rpc_is_fuzzed() -> None:
    assert len(METHODS) == 17
