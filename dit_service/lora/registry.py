"""``LoraRegistry``: the adapter store plus an LRU cache of loaded adapters on the DiT's device.

The cache holds adapters up to a memory budget (``--lora-cache-mb``). A request pins the
adapters of its blend from admission to its end (:meth:`LoraRegistry.pinned`): one not yet
loaded is read from disk and moved to the device on a helper thread, so the request waits for
that load only, not for other requests, and concurrent requests for the same adapter share one
load. Room is made by evicting the least recently used unpinned adapters; when pinned ones fill
the budget the request is refused with RESOURCE_EXHAUSTED (another replica, or later, may take
it). An adapter whose file changed on disk (deleted and uploaded again) is loaded again.

Bookkeeping runs on the event loop only; the worker thread reads the loaded factors, which never
change once loaded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dit_service.lora.format import AdapterHeader, LinearShapes, LoraAdapter, device_bytes, load_adapter
from dit_service.lora.store import AdapterStore, StoredAdapter
from shared.errors import InvalidArgument, NotFound, ResourceExhausted
from shared.validation import check_lora_id

log = logging.getLogger(__name__)
MIB = 1024 * 1024
_SPOOL_BYTES = 64 * MIB


@dataclass(frozen=True)
class LoraInfo:
    """What ``ListLoras`` reports about one adapter."""

    lora_id: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    num_modules: int
    size_bytes: int
    loaded: bool


@dataclass(frozen=True)
class RegistryConfig:
    root: Optional[Path]            # the adapters folder (None: no adapters on this replica)
    cache_bytes: int = 1024 * MIB   # device memory budget of loaded adapters
    max_upload_bytes: int = 1024 * MIB


class _Entry:
    def __init__(self, adapter: LoraAdapter, version: tuple[int, int]) -> None:
        self.adapter = adapter
        self.version = version
        self.pins = 0


class LoraRegistry:
    """See the module docstring. ``targets``: the decoder's Linear layers; factors live on ``device`` in ``dtype``."""

    def __init__(self, config: RegistryConfig, targets: LinearShapes, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.targets = targets
        self.device, self.dtype = device, dtype
        self.store = AdapterStore(config.root, targets) if config.root is not None else None
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._loading: dict[tuple[str, tuple[int, int]], asyncio.Future] = {}
        self._reserved = 0

    @property
    def used_bytes(self) -> int:
        return sum(entry.adapter.num_bytes for entry in self._cache.values()) + self._reserved

    async def scan(self) -> list[LoraInfo]:
        """Discover the adapters on disk (at start-up)."""
        if self.store is None:
            return []
        found = await asyncio.to_thread(self.store.scan)
        return [self._info(entry) for entry in found]

    async def list(self, lora_ids: Sequence[str] = ()) -> tuple[list[LoraInfo], list[str]]:
        """``(known adapters, requested ids that are missing)``; no ids: every adapter on disk."""
        if not lora_ids:
            return await self.scan(), []
        infos, missing = [], []
        for lora_id in dict.fromkeys(lora_ids):
            stored = await self._find(lora_id)
            if stored is None:
                missing.append(lora_id)
            else:
                infos.append(self._info(stored))
        return infos, missing

    @contextlib.asynccontextmanager
    async def pinned(self, blend: Sequence[tuple[str, float]]) -> AsyncIterator[tuple[tuple[LoraAdapter, float], ...]]:
        """Load (if needed) and pin the blend's adapters for the block; yields ``((adapter, scale), ...)``."""
        entries: list[_Entry] = []
        try:
            for lora_id, _ in blend:
                entry = await self._loaded(lora_id)
                entry.pins += 1
                entries.append(entry)
            yield tuple((entry.adapter, scale) for entry, (_, scale) in zip(entries, blend))
        finally:
            for entry in entries:
                entry.pins -= 1

    async def upload(self, lora_id: str, config_text: str, chunks: AsyncIterator[bytes],
                     total_bytes: int) -> tuple[LoraInfo, bool]:
        """Receive, check and store an adapter; returns its info and whether it was already there."""
        check_lora_id("lora_id", lora_id)
        if self.store is None:
            raise InvalidArgument("this DiT replica has no adapter folder", field="lora_id")
        limit = self.config.max_upload_bytes
        if not 0 < total_bytes <= limit:
            raise InvalidArgument(f"total_bytes must be in [1, {limit}] (the upload limit), got {total_bytes}",
                                  field="total_bytes")
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
            received = 0
            async for chunk in chunks:
                received += len(chunk)
                if received > total_bytes:
                    raise InvalidArgument(f"the upload sent more than the announced {total_bytes} bytes",
                                          field="total_bytes")
                spool.write(chunk)
            spool.seek(0)
            stored, already = await asyncio.to_thread(self.store.write, lora_id, config_text, spool, received,
                                                      self._check_fits)
        log.info("adapter %s %s (%d bytes)", lora_id, "already present" if already else "stored", received)
        return self._info(stored), already

    async def delete(self, lora_id: str) -> None:
        """Remove the adapter from disk and the cache (requests holding it finish with it)."""
        check_lora_id("lora_id", lora_id)
        removed = await asyncio.to_thread(self.store.delete, lora_id) if self.store is not None else False
        cached = self._cache.pop(lora_id, None) is not None
        if not (removed or cached):
            raise NotFound(f"no adapter {lora_id!r}", field="lora_id")

    def _check_fits(self, header: AdapterHeader) -> None:
        needed = device_bytes(header, self.targets, self.dtype)
        if needed > self.config.cache_bytes:
            raise InvalidArgument(f"the adapter needs {needed / MIB:.1f} MiB on the device, more than the whole "
                                  f"adapter cache ({self.config.cache_bytes / MIB:.0f} MiB, --lora-cache-mb)",
                                  field="adapter")

    async def _find(self, lora_id: str) -> Optional[StoredAdapter]:
        check_lora_id("lora_id", lora_id)
        if self.store is None:
            return None
        return await asyncio.to_thread(self.store.find, lora_id)

    async def _loaded(self, lora_id: str) -> _Entry:
        stored = await self._find(lora_id)
        if stored is None:
            raise InvalidArgument(f"lora_id {lora_id!r} is not a known adapter (upload it first)", field="lora_id")
        entry = self._cache.get(lora_id)
        if entry is not None and entry.version == stored.version:
            self._cache.move_to_end(lora_id)
            return entry
        key = (lora_id, stored.version)
        if key not in self._loading:
            self._loading[key] = asyncio.ensure_future(self._load(stored))
        return await asyncio.shield(self._loading[key])

    async def _load(self, stored: StoredAdapter) -> _Entry:
        needed = device_bytes(stored.header, self.targets, self.dtype)
        try:
            self._make_room(stored.lora_id, needed)
            self._reserved += needed
            try:
                adapter = await asyncio.to_thread(load_adapter, stored.folder, stored.lora_id, self.targets,
                                                  self.dtype, self.device)
            finally:
                self._reserved -= needed
            entry = self._cache[stored.lora_id] = _Entry(adapter, stored.version)
            self._cache.move_to_end(stored.lora_id)
            log.info("adapter %s loaded (%.1f MiB; cache %.1f MiB)", stored.lora_id, needed / MIB,
                     self.used_bytes / MIB)
            return entry
        finally:
            self._loading.pop((stored.lora_id, stored.version), None)

    def _make_room(self, lora_id: str, needed: int) -> None:
        """Evict least recently used unpinned adapters (and any stale copy of ``lora_id``) until ``needed`` fits."""
        stale = self._cache.get(lora_id)
        if stale is not None and stale.pins == 0:
            del self._cache[lora_id]
        budget = self.config.cache_bytes
        for name in [name for name, entry in self._cache.items() if entry.pins == 0]:
            if self.used_bytes + needed <= budget:
                break
            del self._cache[name]
        if self.used_bytes + needed > budget:
            raise ResourceExhausted(f"the adapter cache ({budget / MIB:.0f} MiB, --lora-cache-mb) is held by "
                                    f"adapters in use; {lora_id!r} needs {needed / MIB:.1f} MiB more")

    def _info(self, stored: StoredAdapter) -> LoraInfo:
        header = stored.header
        entry = self._cache.get(stored.lora_id)
        return LoraInfo(lora_id=stored.lora_id, rank=header.config.rank, alpha=header.config.alpha,
                        targets=header.targets, num_modules=len(header.modules), size_bytes=header.size_bytes,
                        loaded=entry is not None and entry.version == stored.version)
