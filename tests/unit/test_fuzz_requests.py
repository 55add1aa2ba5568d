"""Every Task request decoder and handler, fed random bytes through the real ttrpc
server and TaskService (with the fake runc): each call gets an answer (a message
or a ttrpc error), never a crash or a dropped connection, and the shim keeps
serving a real container afterwards."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import trio
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
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


# -- well-formed requests with hostile field values ------------------------------
#
# Random bytes mostly fail to decode, so the handlers behind the decoders see
# little. Here every request decodes: built from the request type's descriptor,
# with ids that escape directories or name a live "victim" container (any RPC
# may hit it: Kill, Pause, Exec, Checkpoint, Delete...), JSON that is almost a
# process spec or resources, odd signals and timestamps; sent under both
# service names. The shim answers each on the same connection, "keep" (never
# named) is untouched, and "victim" is still answered for.

TEXT = st.one_of(
    st.sampled_from(["victim", "e1", "", ".", "..", "../x", "a/b", "nope", "a\x00b", "x" * 100]),
    st.sampled_from(["/", "/dev/null", "rel/path"]),
    # protobuf strings are UTF-8: no lone surrogates (Cs)
    st.text(
        alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)),
        max_size=12,
    ),
).filter(lambda s: s != "keep")
BYTES = st.one_of(
    st.binary(max_size=32),
    st.sampled_from(
        [b"", b"{}", b"null", b'{"args": ["sleep", "1"], "cwd": "/"}', b'{"pids": {"limit": 9}}']
    ),
)
TYPE_URLS = st.sampled_from(
    [
        "",
        "containerd.runc.v1.Options",
        "containerd.runc.v1.CheckpointOptions",
        "containerd.linux.runc.CreateOptions",
        "runtimeoptions.v1.Options",
        "types.containerd.io/opencontainers/runtime-spec/1/Process",
        "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
        "x/y",
    ]
)
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


IDS = {
    # most requests are for the victim, so the handlers behind the lookups run
    "id": st.one_of(st.just("victim"), TEXT),
    "exec_id": st.one_of(st.sampled_from(["", "e1", "e2"]), TEXT),
    "type_url": TYPE_URLS,
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return IDS.get(field.name, TEXT)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return BYTES
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(0, 6)
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        # small values (signals, sizes) as often as extreme ones
        return st.one_of(st.integers(0, 40), st.integers(low, high))
    return st.floats(allow_nan=False)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of this type with some fields set, recursively (depth-limited)."""
    cls = GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.GetOptions().map_entry:
                continue
            value = messages(field.message_type, depth + 1)
        else:
            value = _scalar(field)
        repeated = field.is_repeated
        fields[field.name] = st.lists(value, max_size=3) if repeated else value

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for item in value:
                        getattr(msg, name).add().CopyFrom(item)
                else:
                    getattr(msg, name).extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    required = {name: fields.pop(name) for name in ("id", "exec_id") if name in fields}
    return st.fixed_dictionaries(required, optional=fields).map(build)


INPUTS = {m.name: m.input_type for m in api.DESCRIPTOR.services_by_name["Task"].methods}
SERVICES = ["containerd.task.v2.Task", "containerd.task.v3.Task"]
structured_calls = st.lists(
    st.sampled_from(METHODS).flatmap(
        lambda m: st.tuples(st.sampled_from(SERVICES), st.just(m), messages(INPUTS[m]))
    ),
    min_size=10,
    max_size=40,
)


async def _fuzz_structured(shim: Shim, calls: list[tuple[str, str, Message]]) -> None:
    os.chdir(shim.base)  # relative paths in requests land here (forked child: ours alone)
    keep = await shim.run("keep", ["sleep", "60"])
    await shim.run("victim", ["sleep", "60"])
    for service, method, request in calls:
        # timeout_nano: a Wait on "victim" is answered DEADLINE_EXCEEDED, not kept open
        with trio.fail_after(TIMEOUT), contextlib.suppress(TTRPCError):
            await shim.client.call(service, method, request, RESPONSES[method], timeout=1)
    state = await shim.state("keep")
    assert (state.pid, state.status) == (keep, 2)
    with contextlib.suppress(TTRPCError):  # answered, whatever state it is in now
        await shim.state("victim")
    await shim.kill_and_delete("keep")


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(calls=structured_calls)
def test_wellformed_hostile_requests_never_break_the_shim(
    tmp_path_factory: Any, calls: list[Any]
) -> None:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    run(tmp, lambda shim: _fuzz_structured(shim, calls))
