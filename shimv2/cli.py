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


def _in_fork_server(args: list[str], action: str) -> int | None:
    """The command's exit status from the fork server, or None: run it here."""
    from shimv2 import forkserver

    # Set by the native launcher, for us only: not for runc or the daemon.
    tried = os.environ.pop(forkserver.TRIED_ENV, "")
    if not forkserver.enabled(os.environ):
        return None
    tag = forkserver.version_tag()
    try:
        if tried == tag:
            raise forkserver.Unavailable("the native launcher asked this server already")
        return forkserver.run(args, tag)
    except forkserver.Unavailable:
        if action == "start":
            forkserver.launch(tag)  # for the next start; this one runs here
        return None
    except forkserver.ForkServerError as exc:
        print(f"failed to {action} shim: {exc}", file=sys.stderr)
        return 1


def self_command() -> list[str]:
    """argv that runs this program again, with the interpreter flags we run with
    (the launcher's ``-I -S``, see shimv2.launcher)."""
    flags = ["-I", "-S"] if sys.flags.isolated and sys.flags.no_site else []
    # realpath: the release we run from, even once an upgrade moved the link on
    return [sys.executable, *flags, os.path.realpath(sys.argv[0])]


def version_text(argv0: str) -> str:
    return (
        f"{os.path.basename(argv0).removesuffix('.py') or BINARY_NAME}:\n"
        f"  Version:  {__version__}\n"
        f"  Python version: {sys.version.split()[0]}\n"
    )


def main(argv: list[str] | None = None, local: bool = False) -> int:
    """Run the command line; ``start`` and ``delete`` go to the fork server when
    one runs for this version (``local``: we are that server's child already)."""
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
    if flags.action in ("start", "delete") and not local:
        status = _in_fork_server(args, flags.action)
        if status is not None:
            # The command ran in the server; nothing of ours to finalize, and
            # containerd waits for this process to exit (~1.5 ms of teardown).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    if flags.action == "start":
        from shimv2 import manager

        return manager.start(flags)
    if flags.action == "delete":
        from shimv2 import manager

        return manager.delete(flags)
    if flags.action == "debug":  # flags may follow the action here
        from shimv2 import debugview

        return debugview.main(flags, args[args.index("debug") + 1 :])
    if flags.action == "forkserver":  # internal: launched by ``start`` (see forkserver.py)
        from shimv2 import forkserver

        return forkserver.main(args[args.index("forkserver") + 1 :])
    if flags.action:
        print(f"unknown action {flags.action!r}", file=sys.stderr)
        return 2
    from shimv2 import daemon

    return daemon.run(flags)


if __name__ == "__main__":
    sys.exit(main())
