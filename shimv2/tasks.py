"""Background tasks that must never take the daemon down.

A copy loop, an OOM watcher or an exit handler of one container that fails
unexpectedly is a bug to log, not a reason to stop serving every container
(containerd would see the shim die and force-delete them all).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

log = logging.getLogger(__name__)


class Spawner(Protocol):
    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...


class GuardedNursery:
    """``start_soon`` into ``nursery``, with every Exception logged and swallowed."""

    def __init__(self, nursery: trio.Nursery, owner: str) -> None:
        self._nursery = nursery
        self._owner = owner

    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._nursery.start_soon(self._guard, async_fn, args, name=async_fn)

    async def start(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await self._nursery.start(async_fn, *args)

    async def _guard(self, async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await async_fn(*args)
        except Exception:
            log.exception("%s: background task %s failed", self._owner, async_fn)
