"""Entry point of ``containerd-shim-pyshim-v2``.

containerd runs the binary in three ways (spec: shim-contract.md §3):
``... start`` (must answer in milliseconds), ``... delete`` (cleanup after the
shim is gone) and with no action (the long-lived daemon, started by ``start``).
This module is the one top: it parses the flags (shimv2.flags) and dispatches.
It imports nothing heavy: trio and protobuf are loaded only by the action that
needs them. Nothing imports it back; the fork server gets what it runs from
here, as callables.
"""

from __future__ import annotations

import os
import sys

from shimv2 import __version__
from shimv2.flags import UsageError, parse_flags

BINARY_NAME = "containerd-shim-pyshim-v2"


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

        return forkserver.main(args[args.index("forkserver") + 1 :], _run_local, _preload)
    if flags.action:
        print(f"unknown action {flags.action!r}", file=sys.stderr)
        return 2
    from shimv2 import daemon

    return daemon.run(flags)


def _run_local(argv: list[str]) -> int:
    """What a fork server's child runs: this command line, here (``start``,
    ``delete``, and after a ``start`` the daemon, whose argv has no action)."""
    return main(argv, local=True)


def _preload() -> None:
    """Everything the commands and the daemon import, also lazily: the fork
    server imports it once, before it forks any child."""
    import trio

    import shimv2.cgroups
    import shimv2.console
    import shimv2.daemon
    import shimv2.manager
    import shimv2.mount
    import shimv2.options
    import shimv2.runc
    import shimv2.runccmd
    import shimv2.stdio  # noqa: F401
    from shimv2.api.containerd.task.v2 import shim_pb2  # noqa: F401

    # One empty event loop: trio's lazily built state then lives in the shared,
    # frozen pages instead of being built again (privately) by every daemon.
    trio.run(trio.sleep, 0)


if __name__ == "__main__":
    sys.exit(main())
