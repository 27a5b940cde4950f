"""Test-only fault injection for the streaming RPCs: inert unless ``ACESTEP_TEST_FAULT`` is set.

The reliability tests kill replicas while a call is in flight. On a loaded machine a replica can
finish its call before the kill lands, so the replicas a test sacrifices start with this hook set;
it holds every streaming call of the process at its first output event until the process dies:

* ``pause_before_first_output``: the call streams its other events (accepted, progress) and stops
  just before its first output event, so when it is killed it has emitted no output;
* ``pause_after_first_output``: the call streams its first output event and stops right after it.

Output events are those a client cannot have replayed (audio, files, finished items, LM results).
Never set in a deployment: every streaming call of the process would hang.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, TypeVar

from shared.config import optional_env

log = logging.getLogger(__name__)
PAUSE_BEFORE_FIRST_OUTPUT = "pause_before_first_output"
PAUSE_AFTER_FIRST_OUTPUT = "pause_after_first_output"
TEST_FAULTS = (PAUSE_BEFORE_FIRST_OUTPUT, PAUSE_AFTER_FIRST_OUTPUT)
Event = TypeVar("Event")


def configured_fault() -> str:
    """The fault named by ``ACESTEP_TEST_FAULT``, "" when unset; an unknown name is refused."""
    fault = optional_env("test_fault") or ""
    if fault and fault not in TEST_FAULTS:
        raise ValueError(f"ACESTEP_TEST_FAULT must be one of {', '.join(TEST_FAULTS)} or unset, got {fault!r}")
    if fault:
        log.warning("test fault %s is set: every streaming call will hang at its first output", fault)
    return fault


def inject(events: AsyncIterator[Event], output_types: tuple[type, ...], fault: str) -> AsyncIterator[Event]:
    """``events`` unchanged when ``fault`` is "", else held around the first event of ``output_types``."""
    return _held(events, output_types, fault) if fault else events


async def _held(events: AsyncIterator[Event], output_types: tuple[type, ...], fault: str) -> AsyncIterator[Event]:
    try:
        async for event in events:
            is_output = isinstance(event, output_types)
            if is_output and fault == PAUSE_BEFORE_FIRST_OUTPUT:
                await _hold(fault)
            yield event
            if is_output and fault == PAUSE_AFTER_FIRST_OUTPUT:
                await _hold(fault)
    finally:  # a cancelled call closes the stream it wraps now, as it would without the hook
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


async def _hold(fault: str) -> None:
    """Wait for an event nobody sets: only the process's death (or the call's cancellation) ends it."""
    log.warning("test fault %s: holding this call until the process is killed", fault)
    await asyncio.Event().wait()
