"""What a fork server's child and ``start`` tell each other.

The fork server (shimv2.forkserver) runs ``start`` in a child that already has
everything imported; that child should become the shim's daemon itself rather
than spawn a fresh interpreter. It sets ``caller_pid``/``caller_ppid`` before
running the command; ``manager.start`` leaves its daemon here
(``become_daemon``), and the child serves it once the caller has its answer. A
leaf, so that the manager needs nothing from the fork server above it.
"""

from __future__ import annotations

import os

#: Set in a child of the fork server: the pid of the process that asked and of
#: its parent (containerd); ``start`` then becomes its daemon instead of spawning it.
caller_pid = 0
caller_ppid = 0
#: become_daemon's args and listener, until the fork server's child serves them.
pending_daemon: tuple[list[str], int] | None = None


def become_daemon(args: list[str], listener_fd: int) -> int:
    """In a child of the server running ``start``: this very process becomes the
    shim daemon once the caller has its answer, so ``start`` costs no fork and
    no imports. Returns the daemon's pid: ours."""
    global pending_daemon
    pending_daemon = (list(args), os.dup(listener_fd))  # start closes its copy
    return os.getpid()


def abandon_daemon() -> None:
    """``start`` failed after become_daemon: exit with it instead."""
    global pending_daemon
    if pending_daemon is not None:
        os.close(pending_daemon[1])
        pending_daemon = None
