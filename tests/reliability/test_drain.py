"""SIGTERM drains: in-flight requests finish, new ones are refused or routed elsewhere.

A gateway that gets SIGTERM reports NOT_SERVING, refuses new calls with UNAVAILABLE, lets the
request it is serving finish and then exits 0. A DiT replica that gets SIGTERM finishes its
request while the gateway sends new work to the other replica.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.reliability.conftest import (
    Fleet,
    Stream,
    assert_song_result,
    generate,
    health,
    in_flight,
    metric,
    song_request,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
EXIT_TIMEOUT_S = 60.0


async def _exit_code(process, timeout_s: float = EXIT_TIMEOUT_S) -> int:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"process {process.pid} did not exit within {timeout_s:.0f} s of SIGTERM")
        await asyncio.sleep(0.1)
    return process.returncode


async def _wait_for_health(address: str, wanted: tuple[str, ...], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (status := await health(address, timeout_s=1.0)) not in wanted:
        if time.monotonic() > deadline:
            pytest.fail(f"health of {address} stayed {status}, wanted one of {wanted}")
        await asyncio.sleep(0.02)


async def test_gateway_drain_finishes_in_flight_and_refuses_new(fleet: Fleet, gateways) -> None:
    gateway = gateways("drain-gateway", dit=[fleet.service("dit0"), fleet.service("dit1")],
                       lm=[fleet.service("lm0"), fleet.service("lm1")])
    request = song_request(thinking=True, batch_size=2, seed=5)
    in_flight_stream = Stream(gateway.address, request)
    await asyncio.wait_for(in_flight_stream.accepted.wait(), 30.0)
    await wait_until(lambda: metric(gateway, "acestep_gateway_active_requests") == 1, 30.0, "the request to run")
    gateway.process.send_signal(signal.SIGTERM)
    # While a request is in flight the draining gateway keeps its transport up: it answers health
    # checks (NOT_SERVING) and refuses new calls itself.
    await _wait_for_health(gateway.address, ("NOT_SERVING",))

    refused = await generate(gateway.address, song_request(thinking=False, seed=6), timeout_s=10.0)
    assert refused.code == "UNAVAILABLE", refused.describe()
    assert not in_flight_stream.task.done(), "the refusal must have come while the first request still ran"

    assert_song_result(await in_flight_stream.outcome(), request)
    assert await _exit_code(gateway.process) == 0


async def test_draining_dit_finishes_its_request_while_new_work_goes_elsewhere(fleet: Fleet, spares,
                                                                               gateways) -> None:
    draining, other = spares("dit"), fleet.service("dit0")
    gateway = gateways("drain-dit", dit=[draining, other], lm=[fleet.service("lm0")])
    # One 4-item request per DiT replica (least-loaded balancing spreads them).
    first = [song_request(thinking=False, batch_size=4, seed=s) for s in (50, 60)]
    streams = [Stream(gateway.address, r) for r in first]
    await wait_until(lambda: in_flight(draining, "Synthesize") >= 1, 60.0, "a request on the draining replica")
    assert not any(s.saw_output for s in streams), "precondition: SIGTERM comes mid-request"
    draining.process.send_signal(signal.SIGTERM)
    await wait_until(lambda: metric(gateway, "acestep_gateway_backend_healthy", target=draining.address) == 0,
                     10.0, "the gateway to see the replica draining")

    later = [song_request(thinking=False, seed=s) for s in (90, 91, 92)]
    later_outcomes = await asyncio.gather(*(generate(gateway.address, r) for r in later))
    for outcome, request in zip(later_outcomes, later):
        assert_song_result(outcome, request)
    for stream, request in zip(streams, first):
        assert_song_result(await stream.outcome(), request)
    # No call was retried: the new requests never went to the draining replica, and the request it
    # held was finished there rather than cut off and replayed elsewhere.
    assert metric(gateway, "acestep_gateway_retries_total", backend="dit") == 0
    assert await _exit_code(draining.process) == 0
    assert_song_result(await generate(gateway.address, later[0]), later[0])
