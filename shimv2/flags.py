"""The shim binary's command line: Go-style single-dash flags, and the argv that
runs this program again.

A leaf every entry module may use (cli, manager, daemon, the fork server, the
debug client): it imports only ``os`` and ``sys``, so ``start`` pays nothing for it.
"""

from __future__ import annotations

import os
import sys

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


class Flags:
    """The parsed command line (a plain class: ``start`` cannot afford dataclasses)."""

    def __init__(self, **values: str | bool) -> None:
        self.namespace = ""
        self.id = ""
        self.address = ""
        self.publish_binary = ""
        self.bundle = ""
        self.socket = ""
        self.debug_socket = ""
        self.debug = False
        self.v = False
        self.info = False
        self.action = ""
        for name, value in values.items():
            if not hasattr(self, name):
                raise TypeError(f"unknown flag {name}")
            setattr(self, name, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flags) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Flags({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


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


def self_command() -> list[str]:
    """argv that runs this program again, with the interpreter flags we run with
    (the launcher's ``-I -S``, see shimv2.launcher)."""
    flags = ["-I", "-S"] if sys.flags.isolated and sys.flags.no_site else []
    # realpath: the release we run from, even once an upgrade moved the link on
    return [sys.executable, *flags, os.path.realpath(sys.argv[0])]
