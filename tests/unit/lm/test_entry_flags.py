"""The LM entry point's flags reach the engine configuration (and bad values are refused)."""

from __future__ import annotations

import pytest

from lm_service.__main__ import engine_config, parse_args
from shared.errors import InvalidArgument

BASE = ["--checkpoints", "/checkpoints", "--model", "acestep-5Hz-lm-1.7B"]


def test_gpu_memory_share_reaches_vllm_and_gpu_ignores_the_cpu_kv_size() -> None:
    config = engine_config(parse_args([*BASE, "--device", "cuda", "--gpu-memory-utilization", "0.45"]))
    assert (config.device, config.gpu_memory_utilization, config.kv_cache_gib) == ("cuda", 0.45, 0.0)


def test_cpu_keeps_its_kv_cache_size() -> None:
    config = engine_config(parse_args([*BASE, "--device", "cpu", "--kv-cache-gib", "2"]))
    assert (config.device, config.kv_cache_gib) == ("cpu", 2.0)


@pytest.mark.parametrize("share", ["0", "1.5"])
def test_a_share_outside_the_range_is_refused_naming_it(share: str) -> None:
    with pytest.raises(InvalidArgument, match=r"gpu_memory_utilization must be in \[0.05, 0.99\]"):
        engine_config(parse_args([*BASE, "--gpu-memory-utilization", share]))
