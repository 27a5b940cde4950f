"""The LM service refuses to start when its KV cache cannot hold one guided (CFG) pair.

``python -m lm_service`` is started on the tiny LM with a KV cache that holds one sequence of
``max_model_len`` tokens but not the two of a guided pair: vLLM itself would accept it, so it is
the pair scheduler's start-up check that must stop the service, with a message that says why and
what to change, and the process must exit instead of serving requests it could never finish.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.lm.conftest import BLOCK_TOKENS, kv_cache_gib_for_blocks

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 512
EXIT_TIMEOUT_S = 300.0


def test_a_kv_cache_too_small_for_a_guided_pair_stops_the_service(lm_dir: Path, tmp_path: Path) -> None:
    blocks_per_sequence = -(-MAX_MODEL_LEN // BLOCK_TOKENS)
    kv_cache_gib = kv_cache_gib_for_blocks(lm_dir, 2 * blocks_per_sequence - 1)  # one sequence fits, a pair not
    port_file = tmp_path / "lm.port"
    command = [sys.executable, "-m", "lm_service", "--checkpoints", str(lm_dir.parent), "--model", lm_dir.name,
               "--backend", "vllm", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", f"{kv_cache_gib:.9f}",
               "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
    env = {key: value for key, value in os.environ.items() if key != "VLLM_CPU_KVCACHE_SPACE"}  # would override
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S,
                              env={**env, "TOKENIZERS_PARALLELISM": "false"}, start_new_session=True)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"the LM service did not exit within {EXIT_TIMEOUT_S:.0f} s:\n{timeout.stderr}")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert not port_file.exists(), "the service must never announce itself as serving"
    refusal = re.search(rf"PairedScheduler: the KV cache holds (\d+) blocks of {BLOCK_TOKENS} tokens; a guided pair "
                        rf"at max_model_len {MAX_MODEL_LEN} needs {2 * blocks_per_sequence}: "
                        r"raise the KV cache size or lower max_model_len", log)
    assert refusal is not None, log[-3000:]
    assert blocks_per_sequence <= int(refusal.group(1)) < 2 * blocks_per_sequence  # one sequence would fit
