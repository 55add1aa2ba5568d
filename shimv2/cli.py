"""Entry point of ``containerd-shim-pyshim-v2``.

containerd runs the binary in three ways (spec: shim-contract.md §3):
``... start`` (must answer in milliseconds), ``... delete`` (cleanup after the
shim is gone) and with no action (the long-lived daemon, started by ``start``).
This module parses Go-style single-dash flags and dispatches. It imports
nothing heavy: trio and protobuf are loaded only by the action that needs them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from shimv2 import __version__

BINARY_NAME = "containerd-shim-pyshim-v2"

_STRING_FLAGS = {
    "namespace",
    "id",
    "address",
    "publish-binary",
    "bundle",
    "socket",
    "debug-socket",
}
_BOOL_FLAGS = {"debug", "v", "info"}
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


class UsageError(Exception):
    """Bad command line; reported on stderr with exit status 2 (as Go's flag package)."""


@dataclass
class Flags:
    namespace: str = ""
    id: str = ""
    address: str = ""
    publish_binary: str = ""
    bundle: str = ""
    socket: str = ""
    debug_socket: str = ""
    debug: bool = False
    v: bool = False
    info: bool = False
    action: str = ""


def parse_flags(argv: list[str]) -> Flags:
    """Parse like Go's ``flag`` package: ``-f v``, ``-f=v``, ``--f``; stop at the first non-flag."""
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name = arg.lstrip("-")
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        attr = name.replace("-", "_")
        if name in _BOOL_FLAGS:
            if value is None or value in _TRUE:
                setattr(flags, attr, True)
            elif value in _FALSE:
                setattr(flags, attr, False)
            else:
                raise UsageError(f"invalid boolean value {value!r} for flag -{name}")
        elif name in _STRING_FLAGS:
            if value is None:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(flags, attr, value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    if i < len(argv):
        flags.action = argv[i]
    return flags


def version_text(argv0: str) -> str:
    return (
        f"{os.path.basename(argv0) or BINARY_NAME}:\n"
        f"  Version:  {__version__}\n"
        f"  Python version: {sys.version.split()[0]}\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    if flags.v:
        sys.stdout.write(version_text(sys.argv[0]) + "\n")
        return 0
    if flags.info:
        from shimv2 import manager

        return manager.info()
    if flags.action == "start":
        from shimv2 import manager

        return manager.start(flags)
    if flags.action == "delete":
        from shimv2 import manager

        return manager.delete(flags)
    if flags.action:
        print(f"unknown action {flags.action!r}", file=sys.stderr)
        return 2
    from shimv2 import daemon

    return daemon.run(flags)


if __name__ == "__main__":
    sys.exit(main())
