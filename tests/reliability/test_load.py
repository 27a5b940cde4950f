"""Load against the shared 2 LM + 2 DiT stack, whose gateway admits 3 running + 3 queued requests.

Twelve clients send 24 requests per round (a third with thinking on, so the LM plans) for three
rounds. Every request must end, within its deadline, either with its songs or with
RESOURCE_EXHAUSTED at admission; the gateway's own counters must agree with what the clients saw;
no slot or in-flight call may be left behind; and the memory of every service (its whole process
tree) must stay flat from round 1 to round 3.
"""

from __future__ import annotations

import asyncio
import collections

import pytest

from tests.load.soak import LoadReport, LoadShape, run_load, services_memory_mib
from tests.reliability.conftest import CALL_TIMEOUT_S, SONG_S, Fleet, metric, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROUNDS = 3
SHAPE = LoadShape(concurrency=12, max_requests=24, duration_s=600.0, song_s=SONG_S, thinking_every=3,
                  timeout_s=CALL_TIMEOUT_S, backoff_s=1.0)
ROUND_TIMEOUT_S = 240.0
GROWTH_FRACTION, GROWTH_MIB = 0.15, 50.0
BACKENDS = ("lm0", "lm1", "dit0", "dit1")


def _check_round(report: LoadReport) -> None:
    assert len(report.outcomes) == SHAPE.max_requests, "every request must finish"
    unexpected = [o for o in report.outcomes if o.code not in ("OK", "RESOURCE_EXHAUSTED")]
    assert not unexpected, f"only OK or RESOURCE_EXHAUSTED allowed: {unexpected}"
    for outcome in report.outcomes:
        if outcome.code == "OK":
            assert len(outcome.item_durations_s) == outcome.expected_items, outcome
            assert all(abs(d - SONG_S) < 0.1 for d in outcome.item_durations_s), outcome
        else:
            assert "capacity" in outcome.details, outcome


def _idle(fleet: Fleet) -> bool:
    """No admission slot held at the gateway, no call in flight on any backend."""
    if metric(fleet.service("gateway"), "acestep_gateway_active_requests") != 0:
        return False
    return all(metric(fleet.service(name), "acestep_rpc_in_flight") == 0 for name in BACKENDS)


def _internal_errors(fleet: Fleet) -> float:
    names = ("gateway", *BACKENDS)
    return sum(metric(fleet.service(n), "acestep_rpc_requests_total", code=c) for n in names
               for c in ("INTERNAL", "UNKNOWN"))


async def test_every_request_completes_or_is_refused_and_memory_stays_flat(fleet: Fleet) -> None:
    gateway = fleet.service("gateway")
    rejected_before = metric(gateway, "acestep_gateway_rejected_total")
    songs_before = metric(gateway, "acestep_gateway_songs_total", outcome="ok")
    internal_before = _internal_errors(fleet)
    totals: collections.Counter = collections.Counter()
    num_songs = 0
    memory = []
    for _ in range(ROUNDS):
        report = await asyncio.wait_for(run_load(fleet.address, SHAPE), ROUND_TIMEOUT_S)
        _check_round(report)
        totals.update(report.statuses)
        num_songs += sum(len(o.item_durations_s) for o in report.outcomes if o.code == "OK")
        await wait_until(lambda: _idle(fleet), 30.0, "the stack to be idle after a round")
        memory.append(services_memory_mib(fleet.shared))
        print(f"round: {report.summary()}")

    assert totals["OK"] >= ROUNDS, totals
    assert totals["RESOURCE_EXHAUSTED"] >= 1, f"12 clients against 3 + 3 slots must see refusals: {totals}"
    assert metric(gateway, "acestep_gateway_rejected_total") - rejected_before == totals["RESOURCE_EXHAUSTED"]
    assert metric(gateway, "acestep_gateway_songs_total", outcome="ok") - songs_before == num_songs
    assert _internal_errors(fleet) == internal_before, "no service may answer INTERNAL or UNKNOWN under load"
    assert all(s.process.poll() is None for s in fleet.shared.services.values())
    first, last = memory[0], memory[-1]
    print("memory MiB round 1 -> round 3: " + ", ".join(f"{n} {first[n]:.0f} -> {last[n]:.0f}" for n in sorted(first)))
    for name, before in first.items():
        assert last[name] <= before * (1 + GROWTH_FRACTION) + GROWTH_MIB, f"{name} grew {before:.0f} -> {last[name]:.0f} MiB"
