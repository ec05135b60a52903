"""Whose turn it is to use the worker: generations one at a time in arrival order, loads before them.

A load (or a restart after a crash) `block()`s new turns at once, waits until the running generation is
done (`wait_idle()`), does its work, then `unblock()`s: requests that queued meanwhile are served by the new
model, in order. Everything here runs on the event loop; `release()` is synchronous so it can be called from
an async generator's `finally` while it is being closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Turns:
    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._busy = False
        self._blocks = 0
        self._idle: asyncio.Event | None = None

    @property
    def waiting(self) -> int:
        """Requests queued, not counting the one running."""
        return sum(1 for f in self._waiters if not f.done())

    @property
    def free(self) -> bool:
        """A request asking now would run at once: none runs, none waits, no load holds the turns."""
        return not self._busy and not self._blocks and not self.waiting

    async def acquire(self) -> None:
        """Wait for this request's turn (FIFO)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._wake()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the turn came just as the waiter gave up: pass it on
            else:
                self._discard(future)
            raise

    def release(self) -> None:
        self._busy = False
        self._wake()

    def block(self) -> None:
        """Hold new turns (a load or restart is coming); the running one finishes."""
        self._blocks += 1

    def unblock(self) -> None:
        self._blocks = max(0, self._blocks - 1)
        self._wake()

    async def wait_idle(self) -> None:
        while self._busy:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    def _discard(self, future: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(future)

    def _wake(self) -> None:
        if not self._busy and self._idle is not None:
            self._idle.set()
            self._idle = None
        if self._busy or self._blocks:
            return
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                self._busy = True
                future.set_result(None)
                return
