"""Admission control, one abstraction for every service: bounded work, a bounded FIFO line, and
RESOURCE_EXHAUSTED beyond it.

Work is counted in units (a request for the gateway and the LM service's tasks, the code items of
an LM plan, the items of a DiT request). ``Admission`` runs at most ``max_active`` units; the next
``max_queued`` units wait in arrival order; anything beyond is refused at once, before the caller
is acknowledged. The DiT batcher schedules its own line (it groups waiting items into batches), so
it uses only the refusal rule, ``refuse_when_full``. Gauges report queued work (waiting for a
slot) apart from active work, so autoscalers see the backlog, not the load being served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from shared.errors import ResourceExhausted


@dataclass(frozen=True)
class AdmissionMetrics:
    """Where an admission reports: units running, units waiting, refusals (any may be None)."""

    active: Any = None
    queued: Any = None
    rejected: Any = None


def refuse_when_full(service: str, queued: int, units: int, max_queued: int, detail: str = "",
                     rejected: Any = None) -> None:
    """Raise RESOURCE_EXHAUSTED when ``units`` more would take the line past ``max_queued``."""
    if queued + units > max_queued:
        if rejected is not None:
            rejected.inc()
        raise ResourceExhausted(f"{service} is at capacity ({detail}{queued} queued, limit {max_queued}); "
                                "retry later")


@dataclass
class _Ticket:
    units: int
    granted: asyncio.Future


class Admission:
    """At most ``max_active`` units run, ``max_queued`` wait in FIFO order (module docstring)."""

    def __init__(self, service: str, max_active: int, max_queued: int,
                 metrics: Optional[AdmissionMetrics] = None) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError(f"max_active must be >= 1 and max_queued >= 0, got {max_active}, {max_queued}")
        self.service = service
        self.max_active = max_active
        self.max_queued = max_queued
        self.metrics = metrics or AdmissionMetrics()
        self.active = 0
        self._line: collections.deque[_Ticket] = collections.deque()
        self._report()

    @property
    def queued(self) -> int:
        """Units waiting for a slot."""
        return sum(ticket.units for ticket in self._line)

    def queue_position(self) -> int:
        """How many waiting requests a new arrival would stand behind (0: it starts at once)."""
        return len(self._line) if self._line or self.active >= self.max_active else 0

    def _clamp(self, units: int) -> int:
        return min(max(1, units), self.max_active)  # a unit count above the limit would never start

    def _must_wait(self, units: int) -> bool:
        return bool(self._line) or self.active + units > self.max_active

    def check_capacity(self, units: int = 1) -> None:
        """Refuse at once (before the request is acknowledged) when it could not even wait in line."""
        units = self._clamp(units)
        if self._must_wait(units):
            refuse_when_full(self.service, self.queued, units, self.max_queued,
                             f"{self.active} running, limit {self.max_active}; ", self.metrics.rejected)

    @contextlib.asynccontextmanager
    async def slot(self, units: int = 1) -> AsyncIterator[None]:
        """Hold ``units`` of capacity for the body; waits in line or refuses when the line is full."""
        units = self._clamp(units)
        if self._must_wait(units):
            self.check_capacity(units)
            ticket = _Ticket(units, asyncio.get_running_loop().create_future())
            self._line.append(ticket)
            self._report()
            try:
                await ticket.granted
            except BaseException:
                if ticket in self._line:
                    self._line.remove(ticket)
                    self._grant()
                elif ticket.granted.done() and not ticket.granted.cancelled():
                    self._release(units)  # the slot was handed over just as we gave up
                self._report()
                raise
        else:
            self.active += units
            self._report()
        try:
            yield
        finally:
            self._release(units)

    def _release(self, units: int) -> None:
        self.active -= units
        self._grant()
        self._report()

    def _grant(self) -> None:
        """Start waiting requests in order while their units fit."""
        while self._line and self.active + self._line[0].units <= self.max_active:
            ticket = self._line.popleft()
            if ticket.granted.done():
                continue
            self.active += ticket.units
            ticket.granted.set_result(None)

    def _report(self) -> None:
        if self.metrics.active is not None:
            self.metrics.active.set(self.active)
        if self.metrics.queued is not None:
            self.metrics.queued.set(self.queued)
