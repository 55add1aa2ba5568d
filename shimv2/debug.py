"""What a live shim holds: a debug service on its own socket, and SIGUSR1 dumps.

The service (``pyshim.debug.v1.Debug/Dump``, an Empty in, a JSON document in a
``google.protobuf.StringValue`` out) listens on ``<shim socket>.debug``, mode
0600, and refuses peers whose uid/gid differ from the daemon's (the ttrpc
server's same-user check): root only for a root shim. It is never served on
containerd's Task API socket. ``containerd-shim-pyshim-v2 debug`` is its client
(:mod:`shimv2.debugview`).

SIGUSR1 writes the trio task tree and every thread's Python stack to the shim
log, as the Go shim dumps its goroutines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any

import trio
from google.protobuf import empty_pb2, wrappers_pb2

from shimv2 import tracing
from shimv2.spool import TOTALS as SPOOLS
from shimv2.ttrpc import Method, RequestContext, Server

if TYPE_CHECKING:
    from shimv2.events import Publisher
    from shimv2.process import Process
    from shimv2.reaper import Reaper
    from shimv2.service import TaskService

log = logging.getLogger(__name__)

DEBUG_SERVICE = "pyshim.debug.v1.Debug"
SOCKET_SUFFIX = ".debug"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def socket_path(shim_socket: str) -> str:
    """The debug socket of the shim listening on ``shim_socket``."""
    return shim_socket.removeprefix("unix://") + SOCKET_SUFFIX


def process_stats() -> dict[str, int]:
    """The daemon's resident memory and open fds."""
    stats = {}
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as f:
        stats["process.memory.usage"] = int(f.read().split()[1]) * _PAGE
    with contextlib.suppress(OSError):
        stats["process.open_file_descriptor.count"] = len(os.listdir("/proc/self/fd"))
    return stats


class Introspection:
    """Reads the daemon's state for the debug view and its counters for the metrics."""

    def __init__(
        self, service: TaskService, publisher: Publisher, reaper: Reaper, server: Server
    ) -> None:
        self.service = service
        self.publisher = publisher
        self.reaper = reaper
        self.server = server

    def stats(self) -> dict[str, int]:
        """Counters and gauges named as in tracing.STATS (plain ints: no lock needed)."""
        counts = self.publisher.counts
        return {
            "pyshim.events.published": counts.published,
            "pyshim.events.journaled": counts.journaled,
            "pyshim.events.retried": counts.retried,
            "pyshim.events.dropped": counts.dropped,
            "pyshim.events.queued": self.publisher.pending,
            "pyshim.spool.held": SPOOLS.held,
            "pyshim.spool.delivered": SPOOLS.delivered,
            "pyshim.spool.dropped": SPOOLS.dropped,
            "pyshim.exits.reaped": self.reaper.reaped,
            **process_stats(),
        }

    def snapshot(self) -> dict[str, Any]:
        service = self.service
        return {
            "pid": os.getpid(),
            "namespace": service.namespace,
            "containers": [
                {
                    "id": c.id,
                    "bundle": c.bundle,
                    "processes": [_process(p) for p in (c.init, *c.execs.values())],
                }
                for c in service.containers.values()
            ],
            "creating": sorted(service._creating),
            "spools": [
                {
                    "label": s.label,
                    "path": s.path,
                    "held": len(s),
                    "limit": s.limit,
                    "dropped": s.dropped,
                    "failed": s.failed,
                }
                for s in SPOOLS.spools()
                if s.fd >= 0 or len(s)
            ],
            "events": self.publisher.snapshot(),
            "reaper": {"reaped": self.reaper.reaped, "children": self.reaper.children},
            "connections": self.server.connections(),
            "stats": self.stats(),
            "tracing": {
                "enabled": tracing.enabled(),
                "otel_modules": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
            },
        }


def _process(p: Process) -> dict[str, Any]:
    return {
        "id": p.id,
        "exec_id": p.exec_id,
        "state": p.state_name,
        "pid": p.pid,
        "exit_status": p.exit_status if p.exited_at_ns is not None else None,
        "exited_at_ns": p.exited_at_ns,
        "stdio": {
            "stdin": p.stdio.stdin,
            "stdout": p.stdio.stdout,
            "stderr": p.stdio.stderr,
            "terminal": p.stdio.terminal,
        },
        "io": type(p.io).__name__ if p.io is not None else None,
    }


def bind(path: str) -> socket.socket:
    """The debug listener, 0600 from the start (a stale file of a dead daemon goes)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


async def serve(
    intro: Introspection,
    listener: socket.socket,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def dump(request: empty_pb2.Empty, ctx: RequestContext) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value=json.dumps(intro.snapshot()))

    server = Server(require_same_user=True)
    server.register_service(DEBUG_SERVICE, {"Dump": Method(empty_pb2.Empty, dump)})
    await server.serve(trio.socket.from_stdlib_socket(listener), task_status=task_status)


def task_tree() -> str:
    """The trio task tree, each task with where it waits."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        where = " <- ".join(
            f"{f.f_code.co_name}:{lineno}" for f, lineno in list(task.iter_await_frames())[::-1]
        )
        lines.append(f"{'  ' * depth}{task.name}  [{where}]")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, 0)
    return "\n".join(lines)


def thread_stacks() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"thread {names.get(ident, ident)}:\n{stack}")
    return "\n".join(parts)


async def dump_on_sigusr1() -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            log.info("SIGUSR1: trio tasks:\n%s\nthreads:\n%s", task_tree(), thread_stacks())
