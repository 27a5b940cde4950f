"""Adapters on the checkpoint volume: ``<root>/<lora_id>/{adapter_config.json, adapter_model.safetensors}``.

Folders are discovered at start (:meth:`AdapterStore.scan`) and on demand (an id asked for that
was not seen yet is looked up again), so adapters copied onto a shared volume by an operator or
uploaded through another replica are found. Ids are validated names, never paths.

An upload is written into a hidden folder of the same volume, checked against the decoder (keys,
shapes, ranks, finite values) and then renamed into place, so a reader never sees half an
adapter. An identical adapter already in place (another replica wrote it to a shared volume) is
accepted; a different one under the same id is refused. Delete renames the folder away first,
then removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch

from dit_service.lora.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterHeader,
    LinearShapes,
    load_adapter,
    parse_config,
    read_header,
)
from shared.errors import AceStepError, InvalidArgument, NotFound
from shared.validation import check_lora_id

log = logging.getLogger(__name__)
_STAGING_PREFIX = ".upload-"
_TRASH_PREFIX = ".deleted-"


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter folder that passed the header checks; ``version`` changes when its file does."""

    lora_id: str
    folder: Path
    header: AdapterHeader
    version: tuple[int, int]   # (mtime_ns, size) of adapter_model.safetensors


class AdapterStore:
    """The adapter folders under ``root`` that fit the decoder's Linear layers ``targets``."""

    def __init__(self, root: Path, targets: LinearShapes) -> None:
        self.root = Path(root)
        self.targets = targets
        self._known: dict[str, StoredAdapter] = {}

    def scan(self) -> list[StoredAdapter]:
        """Every valid adapter folder (an invalid one is logged with its reason and skipped)."""
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        found = []
        for name in names:
            if name.startswith("."):
                continue
            try:
                check_lora_id("lora_id", name)
                entry = self.find(name)
            except AceStepError as error:
                log.warning("skipping adapter folder %s: %s", self.root / name, error.message)
                continue
            if entry is not None:
                found.append(entry)
        return found

    def find(self, lora_id: str) -> Optional[StoredAdapter]:
        """The adapter as it is on disk now (None when absent); raises InvalidArgument when it is broken."""
        folder = self.root / lora_id
        weights = folder / WEIGHTS_FILE
        try:
            stat = weights.stat()
        except FileNotFoundError:
            self._known.pop(lora_id, None)
            if folder.is_dir():
                read_header(folder, self.targets)  # says what is wrong with the folder
            return None
        version = (stat.st_mtime_ns, stat.st_size)
        known = self._known.get(lora_id)
        if known is None or known.version != version:
            known = StoredAdapter(lora_id, folder, read_header(folder, self.targets), version)
            self._known[lora_id] = known
        return known

    def write(self, lora_id: str, config_text: str, weights: BinaryIO, num_bytes: int,
              accept: Callable[[AdapterHeader], None] = lambda header: None) -> tuple[StoredAdapter, bool]:
        """Write, check (``accept`` may refuse the header too) and rename into place; returns the
        adapter and whether an identical one was already there."""
        check_lora_id("lora_id", lora_id)
        parse_config(config_text)  # a bad config fails before any byte is written
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{_STAGING_PREFIX}{lora_id}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            (staging / CONFIG_FILE).write_text(config_text, encoding="utf-8")
            with open(staging / WEIGHTS_FILE, "wb") as out:
                shutil.copyfileobj(weights, out)
                out.flush()
                os.fsync(out.fileno())
            written = (staging / WEIGHTS_FILE).stat().st_size
            if written != num_bytes:
                raise InvalidArgument(f"the upload announced {num_bytes} bytes but sent {written}",
                                      field="total_bytes")
            accept(read_header(staging, self.targets))
            load_adapter(staging, lora_id, self.targets, torch.float32)  # every tensor finite and in shape
            return self._place(lora_id, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete(self, lora_id: str) -> bool:
        """Remove the adapter's folder; False when there was none."""
        check_lora_id("lora_id", lora_id)
        self._known.pop(lora_id, None)
        trash = self.root / f"{_TRASH_PREFIX}{lora_id}-{uuid.uuid4().hex}"
        try:
            os.rename(self.root / lora_id, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _place(self, lora_id: str, staging: Path) -> tuple[StoredAdapter, bool]:
        target = self.root / lora_id
        try:
            os.rename(staging, target)
            already_present = False
        except OSError:  # the id exists: fine only when it holds the same adapter
            if not target.is_dir() or _fingerprint(target) != _fingerprint(staging):
                raise InvalidArgument(f"lora_id {lora_id!r} already exists with a different adapter; delete it "
                                      "first or choose another id", field="lora_id") from None
            already_present = True
        entry = self.find(lora_id)
        if entry is None:
            raise NotFound(f"adapter {lora_id!r} was removed while it was being uploaded", field="lora_id")
        return entry, already_present


def _fingerprint(folder: Path) -> tuple[object, str]:
    """The parsed config and the digest of the weights: equal for the same adapter."""
    digest = hashlib.sha256()
    with open(folder / WEIGHTS_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    return config, digest.hexdigest()
