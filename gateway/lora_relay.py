"""The gateway's LoRA adapter calls, relayed to the DiT replicas.

* Upload: the client's stream is spooled (bounded by ``max_upload_bytes``) and sent to every
  healthy DiT replica in turn; the first one validates it against its decoder (a bad adapter is
  refused there, naming the key, before any replica stores it). Replicas that share a checkpoint
  volume find it already in place and say so.
* List: every healthy replica is asked; the answers are merged by id, ``loaded_on`` naming the
  replicas that hold the adapter on their device.
* Delete: every healthy replica; NOT_FOUND only when no replica knew the adapter.
* :meth:`LoraRelay.check_known`: a generate request's adapters must exist before the LM runs.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Sequence
from typing import Any, BinaryIO

import grpc

from gateway.upstream import Replica
from gateway.upstream_errors import from_upstream
from shared.errors import Internal, InvalidArgument, NotFound, NotReady
from shared.pb.acestep.common.v1 import common_pb2 as pb
from shared.validation import check_lora_id

CHUNK_BYTES = 1024 * 1024
_SPOOL_BYTES = 64 * 1024 * 1024


class LoraRelay:
    """``dit`` is the orchestrator's DiT caller (balancing, retries) and its replica pool."""

    def __init__(self, dit: Any, max_upload_bytes: int) -> None:
        self.dit = dit
        self.max_upload_bytes = max_upload_bytes

    def _replicas(self) -> list[Replica]:
        replicas = sorted((r for r in self.dit.pool.replicas.values() if r.healthy), key=lambda r: r.target)
        if not replicas:
            raise NotReady("no healthy dit replica available", field="dit")
        return replicas

    async def check_known(self, lora_ids: Sequence[str], deadline: Any) -> None:
        """Raise INVALID_ARGUMENT naming the first adapter no DiT replica knows."""
        reply = await self.dit.unary("ListLoras", pb.ListLorasRequest(lora_ids=list(lora_ids)), deadline)
        if reply.missing:
            raise InvalidArgument(f"lora_id {reply.missing[0]!r} is not a known adapter (upload it with UploadLora; "
                                  "ListLoras lists the known ones)", field="lora_id")

    async def upload(self, messages: AsyncIterator[pb.UploadLoraRequest], deadline: Any) -> pb.UploadLoraResponse:
        header = await _header(messages)
        check_lora_id("lora_id", header.lora_id)
        if not 0 < header.total_bytes <= self.max_upload_bytes:
            raise InvalidArgument(f"total_bytes must be in [1, {self.max_upload_bytes}] (the upload limit), got "
                                  f"{header.total_bytes}", field="total_bytes")
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
            await _spool(messages, spool, header.total_bytes)
            replies = []
            for replica in self._replicas():
                spool.seek(0)
                replies.append(await self._call(replica, "UploadLora", _resend(header, spool), deadline))
        return pb.UploadLoraResponse(lora=replies[0].lora, already_present=all(r.already_present for r in replies))

    async def list(self, request: pb.ListLorasRequest, deadline: Any) -> pb.ListLorasResponse:
        replicas = self._replicas()
        replies = await asyncio.gather(*(self._call(r, "ListLoras", request, deadline) for r in replicas))
        merged: dict[str, pb.LoraInfo] = {}
        for replica, reply in zip(replicas, replies):
            for info in reply.loras:
                entry = merged.setdefault(info.lora_id, pb.LoraInfo(
                    lora_id=info.lora_id, rank=info.rank, alpha=info.alpha, targets=info.targets,
                    num_modules=info.num_modules, size_bytes=info.size_bytes))
                if info.loaded:
                    entry.loaded = True
                    entry.loaded_on.append(replica.target)
        missing = [lora_id for lora_id in dict.fromkeys(request.lora_ids) if lora_id not in merged]
        return pb.ListLorasResponse(loras=[merged[k] for k in sorted(merged)], missing=missing)

    async def delete(self, request: pb.DeleteLoraRequest, deadline: Any) -> pb.DeleteLoraResponse:
        check_lora_id("lora_id", request.lora_id)
        deleted = False
        for replica in self._replicas():
            try:
                await self._call(replica, "DeleteLora", request, deadline)
                deleted = True
            except NotFound:
                continue  # this replica did not have it (or a replica sharing its volume removed it first)
        if not deleted:
            raise NotFound(f"no adapter {request.lora_id!r}", field="lora_id")
        return pb.DeleteLoraResponse(lora_id=request.lora_id)

    async def _call(self, replica: Replica, method: str, request: Any, deadline: Any) -> Any:
        try:
            return await getattr(replica.stub, method)(request, timeout=deadline())
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(error.details() or "not found", field="lora_id") from None
            typed = from_upstream(error, "dit")
            if isinstance(typed, InvalidArgument):
                raise typed from None
            raise Internal(f"{method} on dit replica {replica.target}: {typed.message}") from None


async def _header(messages: AsyncIterator[pb.UploadLoraRequest]) -> pb.LoraUploadHeader:
    first = await anext(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("an upload starts with its header (lora_id, adapter_config_json, total_bytes)",
                              field="header")
    return first.header


async def _spool(messages: AsyncIterator[pb.UploadLoraRequest], spool: BinaryIO, total_bytes: int) -> None:
    received = 0
    async for message in messages:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument("an upload sends one header, then only chunks", field="chunk")
        received += len(message.chunk)
        if received > total_bytes:
            raise InvalidArgument(f"the upload sent more than the announced {total_bytes} bytes", field="total_bytes")
        spool.write(message.chunk)
    if received != total_bytes:
        raise InvalidArgument(f"the upload announced {total_bytes} bytes but sent {received}", field="total_bytes")


async def _resend(header: pb.LoraUploadHeader, spool: BinaryIO) -> AsyncIterator[pb.UploadLoraRequest]:
    yield pb.UploadLoraRequest(header=header)
    for block in iter(lambda: spool.read(CHUNK_BYTES), b""):
        yield pb.UploadLoraRequest(chunk=block)
