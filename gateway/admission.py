"""Admission control: at most ``max_active`` requests run, ``max_queued`` wait in FIFO order,
anything beyond is refused with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator

from shared import metrics
from shared.errors import ResourceExhausted


class Admission:
    def __init__(self, max_active: int, max_queued: int) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.active = 0
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    def queue_position(self) -> int:
        """How many requests a new arrival would wait behind (0: it starts at once)."""
        return len(self._waiting) if self.active >= self.max_active else 0

    def check_capacity(self) -> None:
        """Refuse at once (before the request is acknowledged) when the line is already full."""
        if self.active >= self.max_active and len(self._waiting) >= self.max_queued:
            metrics.GATEWAY_REJECTED.inc()
            raise ResourceExhausted(
                f"gateway is at capacity ({self.active} running, {len(self._waiting)} queued, "
                f"limit {self.max_active} + {self.max_queued}); retry later")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one active slot for the body; waits in line or refuses when the line is full."""
        if self.active >= self.max_active or self._waiting:
            if len(self._waiting) >= self.max_queued:
                metrics.GATEWAY_REJECTED.inc()
                raise ResourceExhausted(
                    f"gateway is at capacity ({self.active} running, {len(self._waiting)} queued, "
                    f"limit {self.max_active} + {self.max_queued}); retry later")
            ticket = asyncio.get_running_loop().create_future()
            self._waiting.append(ticket)
            try:
                await ticket
            except BaseException:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                elif ticket.done() and not ticket.cancelled():
                    self._release()  # the slot was handed over just as we gave up
                raise
        else:
            self.active += 1
        metrics.GATEWAY_ACTIVE_REQUESTS.set(self.active)
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            ticket = self._waiting.popleft()
            if not ticket.done():
                ticket.set_result(None)  # the slot passes to the next in line; active stays the same
                return
        self.active -= 1
        metrics.GATEWAY_ACTIVE_REQUESTS.set(self.active)
