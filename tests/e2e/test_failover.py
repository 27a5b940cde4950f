"""Failure paths end to end: client cancellation, deadlines and a dead DiT replica.

Backend work must stop when the client goes away; the proof is each backend's own metrics
(running LM sequences, DiT items in a batch or waiting, RPC outcomes), not the gateway's word.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import grpc
import pytest

from gateway import sdk
from shared.constants import SAMPLE_RATE_HZ
from shared.pb.acestep.common.v1 import common_pb2
from shared.types import GenerationConfig, GenerationParams
from tests.e2e.helpers import cpu_used, dits, live_dits, lms, metric, quick_params, rpc_count, rpc_error, wait_until

STOP_WITHIN_S = 8.0
LONG_PLAN = GenerationParams(caption="an epic ten minute prog-rock suite", duration=600.0, thinking=True,
                             instrumental=True)
LONG_SYNTHESIS = quick_params(duration=180.0)  # about half a second per diffusion step on CPU
ABORTED = ("CANCELLED", "DEADLINE_EXCEEDED")
IDLE_CPU_S = 0.3  # a batch keeps both cores busy; an idle replica only answers probes


def _cancel_at(stub, params: GenerationParams, config: GenerationConfig, stage: int,
               busy: Callable[[], bool]) -> None:
    """Start a Generate stream; once a progress event of ``stage`` with a step arrives and the
    backend's metrics show the work (``busy``), cancel the stream."""
    call = stub.Generate(sdk.build_request(params, config))
    with pytest.raises(grpc.RpcError) as caught:
        for event in call:
            if event.HasField("progress") and event.progress.stage == stage and event.progress.current >= 1:
                wait_until(busy, bool, STOP_WITHIN_S, f"backend metrics showing stage {stage} at work")
                call.cancel()
    assert caught.value.code() == grpc.StatusCode.CANCELLED


def _lm_running(stack) -> float:
    return metric(lms(stack), "acestep_lm_running_sequences")


def _lm_idle(stack) -> bool:
    return _lm_running(stack) == 0 and metric(lms(stack), "acestep_lm_queue_depth") == 0


def _dit_items(stack) -> float:
    services = live_dits(stack)
    return metric(services, "acestep_dit_active_items") + metric(services, "acestep_dit_queue_depth")


def _assert_dit_stopped(stack) -> None:
    """No item active or queued, and the DiT processes go quiet (the step in flight may finish)."""
    wait_until(lambda: _dit_items(stack), lambda n: n == 0, STOP_WITHIN_S, "no active or queued DiT item")
    wait_until(lambda: cpu_used(live_dits(stack), 1.0), lambda seconds: seconds < IDLE_CPU_S, STOP_WITHIN_S,
               "DiT processes idle (CPU seconds per second)")


def test_cancel_during_lm_codes_stops_the_lm(stub, stack) -> None:
    cancelled_before = rpc_count(lms(stack), "Plan", "CANCELLED")
    synthesized_before = rpc_count(dits(stack), "Synthesize", "OK", *ABORTED)

    _cancel_at(stub, LONG_PLAN, GenerationConfig(batch_size=1, seeds=[1]), common_pb2.STAGE_LM_CODES,
               busy=lambda: _lm_running(stack) > 0)

    wait_until(lambda: rpc_count(lms(stack), "Plan", "CANCELLED"), lambda n: n == cancelled_before + 1,
               STOP_WITHIN_S, "Plan CANCELLED on the LM")
    wait_until(lambda: _lm_idle(stack), bool, STOP_WITHIN_S, "no running LM sequence")
    assert rpc_count(dits(stack), "Synthesize", "OK", *ABORTED) == synthesized_before  # never reached the DiT


def test_cancel_during_diffusion_stops_the_dit(stub, stack) -> None:
    cancelled_before = rpc_count(dits(stack), "Synthesize", "CANCELLED")
    items_before = metric(dits(stack), "acestep_dit_items_total", outcome="cancelled")
    decodes_before = metric(dits(stack), "acestep_dit_decode_seconds_count")

    _cancel_at(stub, LONG_SYNTHESIS, GenerationConfig(batch_size=3, audio_format="wav"), common_pb2.STAGE_DIFFUSION,
               busy=lambda: metric(live_dits(stack), "acestep_dit_active_items") == 3)

    wait_until(lambda: rpc_count(dits(stack), "Synthesize", "CANCELLED"), lambda n: n == cancelled_before + 1,
               STOP_WITHIN_S, "Synthesize CANCELLED on a DiT")
    _assert_dit_stopped(stack)
    assert metric(dits(stack), "acestep_dit_items_total", outcome="cancelled") == items_before + 3
    assert metric(dits(stack), "acestep_dit_decode_seconds_count") == decodes_before  # stopped before decoding


def test_deadline_during_lm_planning(stub, stack) -> None:
    aborted_before = rpc_count(lms(stack), "Plan", *ABORTED)
    started = time.monotonic()
    error = rpc_error(lambda: stub.Generate(sdk.build_request(LONG_PLAN, GenerationConfig(batch_size=1)), timeout=4.0))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10.0

    wait_until(lambda: rpc_count(lms(stack), "Plan", *ABORTED), lambda n: n == aborted_before + 1,
               STOP_WITHIN_S, "Plan aborted on the LM")
    wait_until(lambda: _lm_idle(stack), bool, STOP_WITHIN_S, "no running LM sequence")


def test_deadline_during_diffusion(stub, stack) -> None:
    aborted_before = rpc_count(dits(stack), "Synthesize", *ABORTED)
    request = sdk.build_request(LONG_SYNTHESIS, GenerationConfig(batch_size=3, audio_format="wav"))
    error = rpc_error(lambda: stub.Generate(request, timeout=3.0))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    wait_until(lambda: rpc_count(dits(stack), "Synthesize", *ABORTED), lambda n: n == aborted_before + 1,
               STOP_WITHIN_S, "Synthesize aborted on a DiT")
    _assert_dit_stopped(stack)


@pytest.mark.destructive
def test_killed_dit_replica_is_skipped(client, stack) -> None:
    gateway = stack.services["gateway"]
    victim, survivor = sorted(dits(stack), key=lambda s: s.address)  # the gateway's first pick on a tie
    served_before = rpc_count([survivor], "Synthesize", "OK")
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)

    config = GenerationConfig(batch_size=1, seeds=[5], audio_format="wav")
    for _ in range(2):  # at once (a retry moves it) and after the health check noticed
        result = sdk.generate_music(client, quick_params(), config)
        assert result.success, result.error
        assert result.audios[0].tensor.shape[-1] == 10 * SAMPLE_RATE_HZ
    assert rpc_count([survivor], "Synthesize", "OK") == served_before + 2
    wait_until(lambda: metric([gateway], "acestep_gateway_backend_healthy", backend="dit", target=victim.address),
               lambda value: value == 0, STOP_WITHIN_S, "killed replica marked unhealthy")
