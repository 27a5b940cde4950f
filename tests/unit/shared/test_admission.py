"""The one admission abstraction: units, FIFO order, refusal before acknowledgement, cancellation,
and gauges that count queued work apart from active work."""

from __future__ import annotations

import asyncio

import pytest

from shared.admission import Admission, AdmissionMetrics, refuse_when_full
from shared.errors import ResourceExhausted


class Gauge:
    def __init__(self) -> None:
        self.value = None

    def set(self, value) -> None:
        self.value = value


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


async def _hold(admission: Admission, units: int, order: list, name: str, release: asyncio.Event) -> None:
    async with admission.slot(units):
        order.append(name)
        await release.wait()


async def test_units_queue_in_order_and_gauges_split_active_from_queued() -> None:
    active, queued, rejected = Gauge(), Gauge(), Counter()
    admission = Admission("LM service", max_active=4, max_queued=3, metrics=AdmissionMetrics(active, queued, rejected))
    order: list[str] = []
    releases = {name: asyncio.Event() for name in "abcd"}
    tasks = {}
    for name, units in (("a", 3), ("b", 2), ("c", 1)):
        tasks[name] = asyncio.ensure_future(_hold(admission, units, order, name, releases[name]))
        await asyncio.sleep(0)
    # a (3 units) runs; b (2) does not fit; c (1) would fit but waits behind b (FIFO)
    assert order == ["a"] and (active.value, queued.value) == (3, 3)
    assert admission.queue_position() == 2
    with pytest.raises(ResourceExhausted, match=r"LM service is at capacity \(3 running, limit 4; 3 queued"):
        admission.check_capacity(1)
    assert rejected.value == 1
    releases["a"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["a", "b", "c"] and (active.value, queued.value) == (3, 0)
    releases["b"].set()
    releases["c"].set()
    await asyncio.gather(*tasks.values())
    assert (admission.active, active.value, queued.value) == (0, 0, 0)


async def test_a_cancelled_waiter_leaves_the_line_and_lets_the_next_in() -> None:
    admission = Admission("gateway", max_active=1, max_queued=2)
    order: list[str] = []
    release = asyncio.Event()
    first = asyncio.ensure_future(_hold(admission, 1, order, "first", release))
    await asyncio.sleep(0)
    doomed = asyncio.ensure_future(_hold(admission, 1, order, "doomed", release))
    third = asyncio.ensure_future(_hold(admission, 1, order, "third", release))
    await asyncio.sleep(0)
    assert admission.queued == 2
    doomed.cancel()
    await asyncio.sleep(0)
    assert admission.queued == 1
    release.set()
    await asyncio.gather(first, third)
    assert order == ["first", "third"] and admission.active == 0


async def test_more_units_than_the_limit_still_run_alone() -> None:
    admission = Admission("LM service", max_active=2, max_queued=0)
    async with admission.slot(8):
        assert admission.active == 2
        with pytest.raises(ResourceExhausted):
            admission.check_capacity(1)
    assert admission.active == 0


def test_refusal_rule_names_the_service_and_the_limit() -> None:
    counter = Counter()
    refuse_when_full("DiT service", 2, 2, 4, "items: ", counter)  # 4 fits
    with pytest.raises(ResourceExhausted, match=r"DiT service is at capacity \(items: 3 queued, limit 4\)"):
        refuse_when_full("DiT service", 3, 2, 4, "items: ", counter)
    assert counter.value == 1
