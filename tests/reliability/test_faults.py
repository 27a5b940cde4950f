"""``kill -9`` of LM and DiT replicas while requests are in flight.

Each test runs its own gateway in front of sacrificial spare replicas plus replicas of the shared
stack, which survive. A request that had streamed no output when its replica died is retried on a
survivor and completes; one that had already streamed output cannot be replayed and fails with a
status that names the stage; the gateway keeps serving with the survivors afterwards.

The victims run with a test fault (``shared.faults``) that holds each of their calls just before
(or just after) its first output until the kill, so they are always mid-call when killed, however
loaded the machine is; the survivors run without one.
"""

from __future__ import annotations

import asyncio

import pytest

from shared.faults import PAUSE_AFTER_FIRST_OUTPUT, PAUSE_BEFORE_FIRST_OUTPUT
from tests.reliability.conftest import (
    Fleet,
    Stream,
    assert_song_result,
    generate,
    in_flight,
    kill_hard,
    live_group_members,
    metric,
    song_request,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


async def _still_serves(address: str) -> None:
    """A planned (thinking) and a direct request both complete through the survivors."""
    requests = [song_request(thinking=True, seed=70), song_request(thinking=False, batch_size=2, seed=80)]
    outcomes = await asyncio.gather(*(generate(address, r) for r in requests))
    for outcome, request in zip(outcomes, requests):
        assert_song_result(outcome, request)


@pytest.mark.spares(lm=1, fault=PAUSE_BEFORE_FIRST_OUTPUT)
async def test_replicas_killed_before_any_output_are_retried_on_survivors(fleet: Fleet, spares, gateways) -> None:
    victim_lm = spares("lm", fault=PAUSE_BEFORE_FIRST_OUTPUT)
    victim_dit = spares("dit", fault=PAUSE_BEFORE_FIRST_OUTPUT)
    survivor_lm, survivor_dit = fleet.service("lm0"), fleet.service("dit0")
    gateway = gateways("faults-before-output", dit=[victim_dit, survivor_dit], lm=[victim_lm, survivor_lm])
    # Two planned requests occupy one LM each; two 4-item requests go straight to one DiT each.
    # Whatever reaches a victim stays there, held before its first output, until the kill.
    requests = [song_request(thinking=True, seed=1), song_request(thinking=True, seed=2),
                song_request(thinking=False, batch_size=4, seed=10), song_request(thinking=False, batch_size=4, seed=20)]
    streams = [Stream(gateway.address, request) for request in requests]
    await wait_until(lambda: in_flight(victim_lm, "Plan") >= 1 and in_flight(victim_dit, "Synthesize") >= 1,
                     120.0, "calls in flight on both victims")
    kill_hard(victim_lm)
    kill_hard(victim_dit)

    outcomes = [await stream.outcome() for stream in streams]
    for outcome, request in zip(outcomes, requests):
        assert_song_result(outcome, request)
    retries = {b: metric(gateway, "acestep_gateway_retries_total", backend=b) for b in ("lm", "dit")}
    print(f"kill -9 of an LM and a DiT replica: {len(outcomes)}/{len(requests)} requests completed, "
          f"retries {retries}")
    # Each victim was cut off with a call in flight that had streamed no output: each such call
    # was retried on a survivor (and, above, completed there).
    assert retries["lm"] >= 1 and retries["dit"] >= 1, retries
    await wait_until(lambda: not live_group_members(victim_lm.process.pid), 30.0,
                     "the killed LM's engine processes to be gone")

    await _still_serves(gateway.address)
    for victim in (victim_lm, victim_dit):
        assert metric(gateway, "acestep_gateway_backend_healthy", target=victim.address) == 0
    for survivor in (survivor_lm, survivor_dit):
        assert metric(gateway, "acestep_gateway_backend_healthy", target=survivor.address) == 1
        assert survivor.process.poll() is None


async def test_dit_killed_after_output_fails_with_the_stage_named(fleet: Fleet, spares, gateways) -> None:
    victim, survivor = spares("dit", fault=PAUSE_AFTER_FIRST_OUTPUT), fleet.service("dit1")
    gateway = gateways("faults-after-output", dit=[victim, survivor], lm=[fleet.service("lm1")])
    # Two concurrent requests, one per DiT (fewest outstanding calls); the victim streams the first
    # PCM chunk of its request and then holds the call until it is killed.
    requests = [song_request(thinking=False, batch_size=4, seed=s, stream_pcm=True) for s in (30, 40)]
    streams = [Stream(gateway.address, r) for r in requests]
    await asyncio.wait_for(asyncio.gather(*(s.first_output.wait() for s in streams)), 120.0)
    assert in_flight(victim, "Synthesize") == 1, "precondition: one request went to the victim"
    kill_hard(victim)

    outcomes = [await stream.outcome() for stream in streams]
    failed = [o for o in outcomes if o.code != "OK"]
    assert len(failed) == 1, [o.describe() for o in outcomes]
    ok_index = next(i for i, o in enumerate(outcomes) if o.code == "OK")
    assert_song_result(outcomes[ok_index], requests[ok_index])
    lost = failed[0]
    assert lost.saw_output
    assert lost.code == "UNAVAILABLE", lost.describe()
    assert lost.detail is not None and lost.detail.stage == "dit", lost.describe()
    assert lost.details.startswith("dit failed:") and "Traceback" not in lost.details, lost.describe()
    assert "result" not in lost.kinds
    print(f"kill -9 of a DiT after output: the other request completed; this one ended {lost.describe()}")
    assert metric(gateway, "acestep_gateway_retries_total", backend="dit") == 0, "a begun answer is never replayed"

    await _still_serves(gateway.address)
    assert metric(gateway, "acestep_gateway_backend_healthy", target=victim.address) == 0
