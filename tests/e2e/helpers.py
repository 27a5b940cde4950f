"""Helpers of the end-to-end tests: request builders, raw calls, decoding and Prometheus scraping."""

from __future__ import annotations

import io
import os
import time
from typing import Callable, Iterable, Optional, TypeVar

import grpc
import numpy as np
import pytest
import soundfile
from prometheus_client.parser import text_string_to_metric_families

from gateway import sdk
from gateway.serve import LocalStack, ServiceProcess
from shared.audio import decode_audio
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.types import GenerationConfig, GenerationParams

T = TypeVar("T")


def quick_params(**overrides) -> GenerationParams:
    """A 10 s text2music request that skips the LM entirely (thinking and every use_cot_* off)."""
    values = dict(caption="lo-fi piano loop", duration=10.0, thinking=False, use_cot_metas=False,
                  use_cot_caption=False, use_cot_language=False)
    values.update(overrides)
    return GenerationParams(**values)


def events_of(stub, params: GenerationParams, config: GenerationConfig,
              timeout: Optional[float] = None) -> list[gw.GenerateEvent]:
    """Every event of one Generate call (raises grpc.RpcError on failure)."""
    return list(stub.Generate(sdk.build_request(params, config), timeout=timeout))


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError that ``call`` (or iterating its result) raises; fails the test if none."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return caught.value


def decode_file(data: bytes) -> tuple[np.ndarray, int, str]:
    """``(waveform [C, S], sample_rate_hz, container)`` of an encoded audio file."""
    waveform, rate = decode_audio(data, field="audio")
    return waveform, rate, soundfile.info(io.BytesIO(data)).format


def samples(service: ServiceProcess) -> list[tuple[str, dict[str, str], float]]:
    """Every Prometheus sample of a service: ``(name, labels, value)``."""
    families = text_string_to_metric_families(service.scrape_metrics())
    return [(s.name, s.labels, s.value) for family in families for s in family.samples]


def metric(services: Iterable[ServiceProcess], name: str, **labels: str) -> float:
    """Sum of one metric's samples over ``services`` whose labels include ``labels``."""
    total = 0.0
    for service in services:
        for sample_name, sample_labels, value in samples(service):
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
                total += value
    return total


def rpc_count(services: Iterable[ServiceProcess], method: str, *codes: str) -> float:
    """Finished RPCs of ``method`` that ended with any of ``codes``, summed over ``services``."""
    return sum(metric(services, "acestep_rpc_requests_total", method=method, code=code) for code in codes)


def wait_until(probe: Callable[[], T], accept: Callable[[T], bool], timeout_s: float, what: str) -> T:
    """Poll ``probe`` until ``accept`` holds; fail naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not accept(value):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout_s:g} s; last value {value!r}")
        time.sleep(0.2)
        value = probe()
    return value


def cpu_seconds(service: ServiceProcess) -> float:
    """User + system CPU time the service's process has used so far (Linux /proc)."""
    fields = open(f"/proc/{service.process.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_used(services: Iterable[ServiceProcess], window_s: float) -> float:
    """CPU seconds ``services`` use together during the next ``window_s`` seconds."""
    services = list(services)
    before = sum(cpu_seconds(service) for service in services)
    time.sleep(window_s)
    return sum(cpu_seconds(service) for service in services) - before


def dits(stack: LocalStack) -> list[ServiceProcess]:
    return [service for name, service in stack.services.items() if name.startswith("dit")]


def live_dits(stack: LocalStack) -> list[ServiceProcess]:
    return [service for service in dits(stack) if service.process.poll() is None]


def lms(stack: LocalStack) -> list[ServiceProcess]:
    return [service for name, service in stack.services.items() if name.startswith("lm")]
