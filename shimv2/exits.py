"""Exit matching: which container process a reaped exit belongs to
(spec: io-and-reaping.md §7.4).

The reaper reports every exit synchronously (:meth:`ExitMatcher.on_exit`). A
process is matched by its pid once it is known to be started; exits that race
a Create/Start are collected by a subscriber and handed over after the start
event (:meth:`ExitMatcher.started`), so ``/tasks/exit`` never precedes
``/tasks/start``. A matched exit is handled in the container's nursery, or at
once when nothing is left to wait for (:meth:`Container.exit_settled`).
"""

from __future__ import annotations

import logging

from shimv2.container import Container
from shimv2.process import Process
from shimv2.reaper import Exit
from shimv2.tasks import Spawner

log = logging.getLogger(__name__)

ExitSubscriber = dict[int, list[Exit]]


class ExitMatcher:
    def __init__(self, nursery: Spawner) -> None:
        self._nursery = nursery
        # pid -> processes known to be started with that pid
        self._running: dict[int, list[tuple[Container, Process]]] = {}
        self._subscribers: list[ExitSubscriber] = []

    def on_exit(self, e: Exit) -> None:
        """Called by the reaper for every exit, synchronously."""
        for subscriber in self._subscribers:
            subscriber.setdefault(e.pid, []).append(e)
        for container, process in self._running.pop(e.pid, []):
            self._exited(container, process, e)

    def subscribe(self) -> ExitSubscriber:
        subscriber: ExitSubscriber = {}
        self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: ExitSubscriber) -> None:
        # By identity: list.remove would take the first *equal* dict, another start's
        # subscriber holding the same exits, whose racing exit would then be lost.
        self._subscribers = [s for s in self._subscribers if s is not subscriber]

    def started(self, container: Container, process: Process, subscriber: ExitSubscriber) -> None:
        """After the start event: handle an exit that raced the start, or watch the pid."""
        self.unsubscribe(subscriber)
        early = subscriber.get(process.pid) if process.pid else None
        if process.reaped or any(p is process for _, p in self._running.get(process.pid, [])):
            return  # its exit is known or already watched: never handle one exit twice
        if early:
            self._exited(container, process, early[0])
        elif process.pid:
            self._running.setdefault(process.pid, []).append((container, process))

    def _exited(self, container: Container, process: Process, e: Exit) -> None:
        """The reaper saw ``process`` exit: mark it at once; record it now if nothing
        is left to wait for, else handle it in the background."""
        process.reaped = True
        if container.exit_settled(process):
            try:
                container.record_exit(process, e)
            except Exception:  # as a background handler's failure would be: logged
                log.exception("recording the exit of %s failed", process.id)
            return
        nursery = container.background() or self._nursery
        nursery.start_soon(container.handle_exit, process, e)

    def forget(self, process: Process) -> None:
        entries = self._running.get(process.pid, [])
        entries[:] = [(c, p) for c, p in entries if p is not process]
        if not entries:
            self._running.pop(process.pid, None)
