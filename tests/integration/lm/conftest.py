"""Shared fixtures of the LM engine tests: the tiny checkpoint and one engine of each backend.

vLLM costs ~30 s to start, so one engine serves the whole session. Its KV cache is sized in
blocks (``KV_CACHE_BLOCKS`` of 128 tokens) so that a few long guided requests make it preempt;
``VLLM_CPU_KVCACHE_SPACE`` would override that size, so it is cleared while the engine starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import pytest_asyncio

from lm_service.engine.config import LmEngineConfig
from lm_service.engine.hf_backend import HfLmEngine
from tests.integration.lm.tiny_lm import write_test_lm

MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 16
KV_CACHE_BLOCKS = 24
BLOCK_TOKENS = 128  # vLLM's CPU default


def kv_cache_gib_for_blocks(lm_dir: Path, num_blocks: int) -> float:
    """float32 K and V for every layer and KV head, ``num_blocks`` blocks of ``BLOCK_TOKENS``."""
    config = json.loads((lm_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    bytes_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    return (num_blocks + 0.5) * BLOCK_TOKENS * bytes_per_token / 2**30


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_lm(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def engine_config(lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LmEngineConfig:
    return LmEngineConfig(
        model_dir=lm_dir,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=MAX_NUM_SEQS,
        kv_cache_gib=kv_cache_gib_for_blocks(lm_dir, KV_CACHE_BLOCKS),
        views_dir=str(tmp_path_factory.mktemp("views")),
    )


@pytest_asyncio.fixture(scope="session")
async def hf_engine(engine_config: LmEngineConfig):
    engine = HfLmEngine(engine_config)
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest_asyncio.fixture(scope="session")
async def vllm_engine(engine_config: LmEngineConfig, tmp_path_factory):
    from lm_service.engine.scheduler import STEP_LOG_ENV
    from lm_service.engine.vllm_engine import VllmLmEngine

    engine = VllmLmEngine(engine_config)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        # the engine-core process records the request ids of every step (read by the batching tests)
        patch.setenv(STEP_LOG_ENV, str(tmp_path_factory.mktemp("lm-steps") / "steps.jsonl"))
        await engine.start()
        engine.step_log = Path(os.environ[STEP_LOG_ENV])
    yield engine
    await engine.shutdown()
