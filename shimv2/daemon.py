"""The long-lived shim daemon (spec: shim-contract.md §5).

``start`` spawned us with the listening socket as fd 3 and /dev/null for stdio,
in the bundle directory. We become the child subreaper, send our log to the
bundle's ``log`` FIFO, serve the Task API until Shutdown (or SIGTERM), then
flush events, remove the socket and exit. Containers outlive the daemon's
connections to containerd: a closed connection is never a reason to stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

import trio

from shimv2 import debug, ksm, tracing
from shimv2.events import Publisher
from shimv2.flags import Flags
from shimv2.reaper import Reaper
from shimv2.service import TASK_SERVICES, TaskService
from shimv2.shimlog import setup_logging
from shimv2.ttrpc import Method, RequestContext, Server

log = logging.getLogger("shimv2")

PR_SET_CHILD_SUBREAPER = 36
LISTENER_FD = 3
LISTEN_BACKLOG = 4096  # as the Go shim (net.Listen: somaxconn); see manager.py
EVENT_FLUSH_TIMEOUT = 5.0
SHUTDOWN_REPLY_TIMEOUT = 0.05
#: Seconds without a new request after which the daemon counts as idle (KSM marks).
IDLE_AFTER = 2.0


def become_subreaper() -> None:
    from shimv2.libc import libc

    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class IdleMarker:
    """With ``PYSHIM_KSM=1``: marks the daemon's private mappings mergeable
    (shimv2.ksm) once it went idle, i.e. IDLE_AFTER s after it started serving
    and again after every burst of requests (new arenas, a grown heap). An idle
    daemon never wakes up for it: a wake-up would write the very pages KSM
    merged (reference counts, the run loop's state)."""

    def __init__(self, marker: ksm.Marker) -> None:
        self.marker = marker
        self._last = 0.0  # trio time of the latest request
        self._requested = trio.Event()

    def watch(self, methods: Mapping[str, Method]) -> dict[str, Method]:
        """``methods`` with each request noted as activity."""

        def noting(handler: Any) -> Any:
            if inspect.iscoroutinefunction(handler):

                async def handle(request: Any, ctx: RequestContext) -> Any:
                    self._noted()
                    return await handler(request, ctx)

                return handle

            def handle_now(request: Any, ctx: RequestContext) -> Any:
                self._noted()
                return handler(request, ctx)

            return handle_now

        return {name: Method(m.request_type, noting(m.handler)) for name, m in methods.items()}

    def _noted(self) -> None:
        self._last = trio.current_time()
        self._requested.set()

    async def run(self) -> None:
        self._last = trio.current_time()
        self._requested.set()  # serving counts as the first burst
        while True:
            await self._requested.wait()
            while (left := self._last + IDLE_AFTER - trio.current_time()) > 0:
                await trio.sleep(left)
            self._requested = trio.Event()  # the burst's requests are behind us
            marked = self.marker.mark()
            if self.marker.failed is not None:
                log.warning("%s=1 but no KSM here: %s", ksm.ENV, self.marker.failed)
                return
            if marked:
                running = "" if ksm.node_runs_ksm() else " (ksmd is not running)"
                log.debug("KSM: marked %d KiB mergeable%s", marked >> 10, running)


def _listener(flags: Flags) -> socket.socket:
    if flags.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(flags.socket)
        os.chmod(flags.socket, 0o600)
        sock.listen(LISTEN_BACKLOG)
        return sock
    sock = socket.socket(fileno=LISTENER_FD)
    # Inherited as fd 3 on purpose, but runc and hooks must not get it: one that
    # outlived us would keep the socket accepting for a dead shim.
    sock.set_inheritable(False)
    return sock


def _socket_path(flags: Flags, listener: socket.socket) -> str:
    """The socket file to remove at exit, known at start-up (in a grouped shim our
    cwd bundle may be deleted first). The listener's own name comes first: a
    spawned daemon can run before ``start`` has written ``address``."""
    if flags.socket:
        return flags.socket
    with contextlib.suppress(OSError):
        name = listener.getsockname()
        if isinstance(name, str) and name.startswith("/"):  # not an abstract name
            return name
    try:
        with open("address") as f:
            return f.read().strip().removeprefix("unix://")
    except OSError:
        return ""


async def serve(flags: Flags, listener: socket.socket, socket_path: str) -> None:
    reaper = Reaper()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    # A daemon started again in a bundle sends what its predecessor could not, first.
    if flags.id:
        publisher.replay(flags.id, os.getcwd())
    shutdown = trio.Event()
    server = Server()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        service = TaskService(
            namespace=flags.namespace,
            reaper=reaper,
            publisher=publisher,
            nursery=nursery,
            on_shutdown=shutdown.set,
        )
        idle = IdleMarker(ksm.Marker()) if ksm.enabled(os.environ) else None
        methods = service.methods()  # once: wrapping every handler costs ~0.5 ms
        if idle is not None:
            methods = idle.watch(methods)
        for name in TASK_SERVICES:
            server.register_service(name, methods)
        intro = debug.Introspection(service, publisher, reaper, server)
        tracing.set_stats_source(intro.stats)
        tracing.configure(os.environ)  # before serving: Create must find it on
        debug_path = debug.socket_path(socket_path) if socket_path else ""
        if debug_path:
            try:
                await nursery.start(debug.serve, intro, debug.bind(debug_path))
            except OSError as exc:
                log.warning("no debug socket %s: %s", debug_path, exc)
                debug_path = ""
        nursery.start_soon(debug.dump_on_sigusr1)
        nursery.start_soon(publisher.run)
        await nursery.start(server.serve, trio.socket.from_stdlib_socket(listener))

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received signal %d, shutting down", signum)
                    shutdown.set()

        nursery.start_soon(stop_on_signal)
        if idle is not None:
            nursery.start_soon(idle.run)
        log.info("serving %s (pid %d)", socket_path, os.getpid())
        await shutdown.wait()
        # Let the Shutdown response reach containerd before the socket goes away:
        # wait until it is written (not a fixed 50 ms: the shim lingered that
        # long after every Shutdown); a request that never ends (a Wait) is not
        # waited for beyond that.
        with trio.move_on_after(SHUTDOWN_REPLY_TIMEOUT):
            await server.drained()
        for path in (socket_path, debug_path):
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if not await publisher.flush(EVENT_FLUSH_TIMEOUT):
            log.warning("exiting with %d undelivered events", publisher.pending)
        publisher.close_journals()
        await tracing.shutdown()
        nursery.cancel_scope.cancel()


def run(flags: Flags) -> int:
    if not flags.namespace:
        sys.stderr.write("shim namespace cannot be empty\n")
        return 1
    setup_logging(flags)
    try:
        become_subreaper()
        listener = _listener(flags)
        trio.run(serve, flags, listener, _socket_path(flags, listener))
    except Exception:
        log.exception("shim daemon failed")
        return 1
    log.info("shim exited")
    return 0
