"""Real stacks on the tiny checkpoints for the documented examples: ``client`` (turbo DiT + LM on
vLLM CPU + gateway) and ``base_client`` (base DiT + gateway). The only change an example gets is
that a gateway client takes the place of ``dit_handler`` and ``llm_handler``."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import sdk
from devtools import tiny_checkpoints
from shared.audio import encode_audio
from shared.constants import SAMPLE_RATE_HZ
from tests.tiny_stack import serving, write_checkpoints

EXAMPLES_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if EXAMPLES_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.vllm)


SOURCE_SECONDS = 2.0  # uploads stay short: VAE encoding on the CPU is slow


@pytest.fixture(scope="package")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoints(tmp_path_factory.mktemp("tiny-checkpoints"))


@pytest.fixture(scope="package")
def client(checkpoints: Path, tmp_path_factory: pytest.TempPathFactory):
    """The turbo model with the LM, as the document's handlers are initialized."""
    with serving(checkpoints, tmp_path_factory.mktemp("turbo-stack"), num_lm=1) as connection:
        yield connection


@pytest.fixture(scope="package")
def base_client(checkpoints: Path, tmp_path_factory: pytest.TempPathFactory):
    """The base model (lego, extract and complete are base-only), without an LM."""
    with serving(checkpoints, tmp_path_factory.mktemp("base-stack"), with_lm=False,
                 dit_model=tiny_checkpoints.BASE_DIR) as connection:
        yield connection


@pytest.fixture(scope="package")
def source_file(client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A song the stack made, cut to ``SOURCE_SECONDS`` and saved as a file (the documents pass paths)."""
    params = sdk.GenerationParams(caption="lo-fi piano loop", duration=10.0, thinking=False, use_cot_metas=False,
                                  use_cot_caption=False, use_cot_language=False)
    result = sdk.generate_music(client, params, sdk.GenerationConfig(batch_size=1, seeds=[7], audio_format="wav"))
    assert result.success, result.error
    waveform = result.audios[0].tensor.numpy()  # [2, S]
    path = tmp_path_factory.mktemp("sources") / "original_song.wav"
    path.write_bytes(encode_audio(waveform[:, : int(SOURCE_SECONDS * SAMPLE_RATE_HZ)], "wav"))
    return str(path)
