"""A real stack (LM on vLLM CPU, one DiT, the gateway) on the tiny checkpoints for the documented
examples, and a ``handlers`` fixture: the only change an example gets is that a gateway client
takes the place of ``dit_handler`` and ``llm_handler``."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import sdk
from gateway.serve import LocalStack
from devtools import tiny_checkpoints

EXAMPLES_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if EXAMPLES_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="package")
def client(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    notes = tiny_checkpoints.write_all(root, seed=0)
    missing = {folder: note for folder, note in notes.items() if note}
    if missing:
        pytest.fail(f"tiny checkpoints incomplete: {missing}")
    stack = LocalStack(root, num_dit=1, num_lm=1, extra_env={"TOKENIZERS_PARALLELISM": "false"},
                       workdir=tmp_path_factory.mktemp("stack"))
    try:
        stack.start(timeout_s=300)
        connection = sdk.AceStepClient(stack.services["gateway"].address)
        yield connection
        connection.close()
    finally:
        stack.stop()
