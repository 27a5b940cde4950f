"""Shared fixtures of the LM engine tests: the tiny checkpoint and one engine of each backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.lm.tiny_lm import write_test_lm


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_lm(tmp_path_factory.mktemp("checkpoints"))
