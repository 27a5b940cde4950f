"""Fixtures of the end-to-end tests: the whole stack as real processes on 127.0.0.1.

One package-scoped stack (1 LM on vLLM CPU, 2 DiT replicas, the gateway) runs on tiny
random-weight checkpoints written once per run. Its gateway refuses uploads above
``MAX_AUDIO_BYTES``, so the upload limit is tested without a second gateway. Tests marked
``destructive`` (they kill a replica) run after every other e2e test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import sdk
from gateway.serve import LocalStack
from devtools.tiny_checkpoints import TINY_LM_ENV
from shared.audio import encode_audio
from shared.constants import SAMPLE_RATE_HZ
from shared.types import GenerationConfig
from tests.e2e.helpers import quick_params
from tests.tiny_stack import write_checkpoints

E2E_DIR = Path(__file__).resolve().parent
MAX_AUDIO_BYTES = 1_000_000
SOURCE_SECONDS = 2.0
GATEWAY_ARGS = ["--max-audio-bytes", str(MAX_AUDIO_BYTES), "--health-interval-s", "1"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "destructive: kills part of the e2e stack; runs after the other e2e tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every e2e test is slow and needs the LM engine; destructive ones move to the end of the
    e2e tests (which stay together, so the package-scoped stack stops right after them)."""
    ours = [item for item in items if E2E_DIR in Path(str(item.fspath)).resolve().parents]
    if not ours:
        return
    for item in ours:
        item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.vllm)
    ordered = sorted(ours, key=lambda item: item.get_closest_marker("destructive") is not None)  # stable
    first = items.index(ours[0])  # everything before it is someone else's
    chosen = set(ours)
    rest = [item for item in items if item not in chosen]
    items[:] = rest[:first] + ordered + rest[first:]


@pytest.fixture(scope="package")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoints(tmp_path_factory.mktemp("tiny-checkpoints"))


@pytest.fixture(scope="package")
def stack(checkpoints: Path, tmp_path_factory: pytest.TempPathFactory):
    local = LocalStack(checkpoints, num_dit=2, num_lm=1, gateway_args=GATEWAY_ARGS, drain_grace_s=2.0, with_http=True,
                       extra_env={"TOKENIZERS_PARALLELISM": "false", **TINY_LM_ENV},
                       workdir=tmp_path_factory.mktemp("stack"))
    try:
        local.start(timeout_s=300)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="package")
def address(stack: LocalStack) -> str:
    return stack.services["gateway"].address


@pytest.fixture(scope="package")
def http_url(stack: LocalStack) -> str:
    """The HTTP edge (``acestep-http``) in front of the stack's gateway, e.g. ``http://127.0.0.1:PORT``."""
    return stack.http_url


@pytest.fixture(scope="package")
def client(address: str):
    connection = sdk.AceStepClient(address)
    yield connection
    connection.close()


@pytest.fixture(scope="package")
def stub(client: sdk.AceStepClient):
    return client.stub()


@pytest.fixture(scope="package")
def source_wav(client: sdk.AceStepClient) -> bytes:
    """``SOURCE_SECONDS`` of generated audio as WAV bytes (short: VAE encoding on CPU is slow)."""
    result = sdk.generate_music(client, quick_params(), GenerationConfig(batch_size=1, seeds=[7], audio_format="wav"))
    assert result.success, result.error
    waveform = result.audios[0].tensor.numpy()  # [2, S]
    return encode_audio(waveform[:, : int(SOURCE_SECONDS * SAMPLE_RATE_HZ)], "wav")
