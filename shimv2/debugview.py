"""``containerd-shim-pyshim-v2 debug -id ID [-namespace NS] [-bundle DIR | -socket PATH]``:
print what a live shim holds, read from its debug socket (shimv2.debug).

The shim's socket is found as containerd finds it: the ``address`` file in the
task's bundle (default state dir, or ``-bundle``), else derived from
``-address`` (containerd's socket), namespace and id; ``-socket`` names it.
An action of the shim binary (cli imports it lazily), so it lives with the
runtime rather than in shimv2.tools.
"""

from __future__ import annotations

import json
import os
import sys

from shimv2.flags import Flags, UsageError, parse_flags

DEFAULT_NAMESPACE = "default"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
TASK_STATE_DIR = "/run/containerd/io.containerd.runtime.v2.task"


def shim_socket(flags: Flags) -> str:
    if flags.socket:
        return flags.socket.removeprefix("unix://")
    namespace = flags.namespace or DEFAULT_NAMESPACE
    bundle = flags.bundle or os.path.join(TASK_STATE_DIR, namespace, flags.id)
    try:
        with open(os.path.join(bundle, "address")) as f:
            return f.read().strip().removeprefix("unix://")
    except OSError:
        from shimv2.manager import socket_path

        return socket_path(flags.address or DEFAULT_ADDRESS, namespace, flags.id)


async def fetch(path: str) -> dict[str, object]:
    from google.protobuf import empty_pb2, wrappers_pb2

    from shimv2.debug import DEBUG_SERVICE
    from shimv2.ttrpc import connect

    async with connect(path) as client:
        answer = await client.call(
            DEBUG_SERVICE, "Dump", empty_pb2.Empty(), wrappers_pb2.StringValue, timeout=10
        )
    data = json.loads(answer.value)
    assert isinstance(data, dict)
    return data


def main(before: Flags, args: list[str]) -> int:
    """``before``: flags given ahead of ``debug``; ``args``: what follows it."""
    try:
        after = parse_flags(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    for name, value in vars(after).items():
        if value and name != "action":
            setattr(before, name, value)
    if not before.id and not before.socket:
        print("debug: -id (or -socket) is required", file=sys.stderr)
        return 2
    import trio

    from shimv2.debug import socket_path
    from shimv2.ttrpc import ConnectionClosedError, TTRPCError

    path = socket_path(shim_socket(before))
    try:
        data = trio.run(fetch, path)
    except (OSError, ConnectionClosedError, TTRPCError) as exc:
        print(f"debug: cannot read the shim's state from {path}: {exc}", file=sys.stderr)
        return 1
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
