"""The test-only fault hook: inert unless ``ACESTEP_TEST_FAULT`` names a fault, then a stream holds
just before or just after its first output event."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from shared import faults

WATCH_S = 0.2  # how long a held stream is watched (it would hold forever)


@dataclass(frozen=True)
class Progress:
    fraction: float


@dataclass(frozen=True)
class Output:
    index: int


async def _events():
    yield Progress(0.5)
    yield Output(0)
    yield Output(1)


def test_the_hook_is_off_unless_the_variable_names_a_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACESTEP_TEST_FAULT", raising=False)
    assert faults.configured_fault() == ""
    monkeypatch.setenv("ACESTEP_TEST_FAULT", "")
    assert faults.configured_fault() == ""
    monkeypatch.setenv("ACESTEP_TEST_FAULT", faults.PAUSE_AFTER_FIRST_OUTPUT)
    assert faults.configured_fault() == faults.PAUSE_AFTER_FIRST_OUTPUT
    monkeypatch.setenv("ACESTEP_TEST_FAULT", "pause_sometimes")
    with pytest.raises(ValueError, match="ACESTEP_TEST_FAULT must be one of .*got 'pause_sometimes'"):
        faults.configured_fault()


async def test_without_a_fault_the_stream_is_passed_through_untouched() -> None:
    events = _events()
    assert faults.inject(events, (Output,), "") is events


async def _take_until_held(stream) -> tuple[list[object], asyncio.Task]:
    """The events ``stream`` yields before it holds, and the pending task of the next one."""
    seen = []
    while True:
        step = asyncio.ensure_future(anext(stream))
        done, _ = await asyncio.wait({step}, timeout=WATCH_S)
        if not done:
            return seen, step
        seen.append(step.result())


@pytest.mark.parametrize("fault, before_hold", [
    (faults.PAUSE_BEFORE_FIRST_OUTPUT, [Progress(0.5)]),
    (faults.PAUSE_AFTER_FIRST_OUTPUT, [Progress(0.5), Output(0)]),
])
async def test_a_fault_holds_the_stream_at_its_first_output(fault: str, before_hold: list[object]) -> None:
    closed = asyncio.Event()

    async def events():
        try:
            async for event in _events():
                yield event
        finally:
            closed.set()

    stream = faults.inject(events(), (Output,), fault)
    seen, held = await _take_until_held(stream)
    assert seen == before_hold
    held.cancel()  # what the call's cancellation does; the wrapped stream is closed with it
    with pytest.raises(asyncio.CancelledError):
        await held
    await stream.aclose()
    assert closed.is_set()
