"""What ``start`` finds on its stdin, and how it answers (spec: compat.md §3).

containerd 1.6 to 2.2 write the runtime options as a bare ``google.protobuf.Any``
(or nothing); 2.3 writes a ``BootstrapParams`` message that carries them in an
extension, plus the socket directory, and accepts a protobuf
``BootstrapResult`` in return. Both start with byte 0x0a and each decodes as
the other, so the kind is decided by the field numbers present: an ``Any`` only
has fields 1 and 2. No protobuf import: this runs on ``start``'s hot path.
"""

from __future__ import annotations

from typing import NamedTuple

from shimv2 import protowire
from shimv2.protowire import type_name

DEBUG_LEVEL = -4  # LogLevel: trace -8, debug -4, info 0, ...
TASK_API_VERSION = 2  # what we answer: version 3 changes containerd's sandbox handling
KNOWN_OPTIONS = {
    "containerd.runc.v1.Options",
    "containerd.linux.runc.CreateOptions",
    "containerd.linux.runc.RuncOptions",
    "runtimeoptions.v1.Options",
}


class StartInput(NamedTuple):
    options: bytes = b""  # a serialized Any, or b""
    bootstrap: bool = False  # containerd >= 2.3: answer with a BootstrapResult
    socket_dir: str = ""
    debug: bool = False


def classify(raw: bytes, container_id: str = "", namespace: str = "") -> StartInput:
    """Decide between nothing, a bare options Any and BootstrapParams (compat.md §3.5)."""
    if not raw:
        return StartInput()
    try:
        msg = protowire.fields(raw)
    except protowire.WireError:
        return StartInput()  # unknown input: ignore it (stderr is the answer pipe)
    is_bootstrap = any(number not in (1, 2) for number in msg) or (
        bool(container_id)
        and protowire.last_string(msg, 1) == container_id
        and protowire.last_string(msg, 2) == namespace
    )
    if not is_bootstrap:
        return StartInput(options=raw)
    options = b""
    for extension in msg.get(8, []):
        if not isinstance(extension, bytes):
            continue
        try:
            candidate = protowire.last_bytes(protowire.fields(extension), 1)
            url = protowire.last_string(protowire.fields(candidate), 1)
        except protowire.WireError:
            continue
        if type_name(url) in KNOWN_OPTIONS:
            options = candidate
            break
    levels = [v for v in msg.get(3, []) if isinstance(v, int)]
    debug = bool(levels) and protowire.signed32(levels[-1]) <= DEBUG_LEVEL
    return StartInput(
        options=options,
        bootstrap=True,
        socket_dir=protowire.last_string(msg, 9),
        debug=debug,
    )


def bootstrap_result(address: str) -> bytes:
    """``BootstrapResult{version, address, protocol}``: fields 1-3 in order, nothing after."""
    return protowire.encode([(1, TASK_API_VERSION), (2, address), (3, "ttrpc")])
