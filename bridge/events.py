"""An in-process event bus for the management SSE stream: a snapshot first, then changes.

Producers call `publish` and never wait: each subscriber has a bounded queue, and a subscriber that falls
behind loses events (with a warning) rather than slowing the engine down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

QUEUE_SIZE = 256


@dataclass
class Event:
    name: str
    data: dict[str, Any] = field(default_factory=dict)


class Subscription:
    def __init__(self, bus: EventBus, first: Event) -> None:
        self._bus = bus
        self.queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_SIZE)
        self.queue.put_nowait(first)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("an event subscriber is too slow; dropped %r", event.name)

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    """Subscribers get `snapshot()` as their first event, then every published event."""

    def __init__(self, snapshot: Callable[[], Event]) -> None:
        self._snapshot = snapshot
        self._subscribers: set[Subscription] = set()

    def publish(self, name: str, data: dict[str, Any] | None = None) -> None:
        event = Event(name, data or {})
        for sub in list(self._subscribers):
            sub.offer(event)

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self._snapshot())
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    async def stream(self) -> AsyncIterator[Event]:
        sub = self.subscribe()
        try:
            while True:
                event = await sub.next()
                if event is not None:
                    yield event
        finally:
            sub.close()
