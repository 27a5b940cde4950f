"""The tiny checkpoints and stacks the end-to-end style test packages share."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest

from devtools import tiny_checkpoints
from gateway import sdk
from gateway.serve import LocalStack


def write_checkpoints(root: Path) -> Path:
    """Every tiny checkpoint under ``root``; a folder the writer could not make fails the test."""
    notes = tiny_checkpoints.write_all(root, seed=0)
    missing = {folder: note for folder, note in notes.items() if note}
    if missing:
        pytest.fail(f"tiny checkpoints incomplete: {missing}")
    return root


@contextlib.contextmanager
def serving(checkpoints: Path, workdir: Path, **options) -> Iterator[sdk.AceStepClient]:
    """A stack on the tiny checkpoints (the tiny LM's budgets capped) and a client of its gateway."""
    stack = LocalStack(checkpoints, num_dit=1, workdir=workdir,
                       extra_env={"TOKENIZERS_PARALLELISM": "false", **tiny_checkpoints.TINY_LM_ENV}, **options)
    try:
        stack.start(timeout_s=300)
        connection = sdk.AceStepClient(stack.services["gateway"].address)
        try:
            yield connection
        finally:
            connection.close()
    finally:
        stack.stop()
