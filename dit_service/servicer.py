"""DitService: thin translations onto the DiT engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import AsyncIterable

from dit_service import convert
from dit_service.engine import DitEngine
from dit_service.events import FileChunk, ItemDone, PcmChunk
from dit_service.lora.registry import LoraInfo
from shared import faults
from shared.errors import AceStepError, InvalidArgument
from shared.grpc_server import abort_with
from shared.pb.acestep.dit.v1 import dit_pb2, dit_pb2_grpc
from shared.pb.acestep.common.v1 import common_pb2
from shared.telemetry import StageSpans
from shared.validation import validate_params

_STAGE_SPANS = {
    common_pb2.STAGE_QUEUED: "queue_wait",
    common_pb2.STAGE_CONDITIONING: "conditioning",
    common_pb2.STAGE_DIFFUSION: "diffusion",
    common_pb2.STAGE_DECODE: "decode",
    common_pb2.STAGE_ENCODE: "encode",
}


def _span_stage(message: dit_pb2.SynthesizeEvent) -> str:
    """Which stage span an event belongs to: waiting for a batch, then the progress stages."""
    kind = message.WhichOneof("event")
    if kind == "accepted":
        return "queue_wait"
    if kind == "progress":
        return _STAGE_SPANS.get(message.progress.stage, "diffusion")
    if kind == "audio":
        return "decode"
    if kind == "file":
        return "encode"
    return "conditioning" if kind == "batch" else "encode"


class DitServicer(dit_pb2_grpc.DitServiceServicer):
    def __init__(self, engine: DitEngine) -> None:
        self.engine = engine
        self.test_fault = faults.configured_fault()  # "" outside the reliability tests

    async def Synthesize(self, request: dit_pb2.SynthesizeRequest, context) -> AsyncIterator[dit_pb2.SynthesizeEvent]:
        synthesis = convert.synthesis_request(request, context.time_remaining())
        validate_params(convert.params_for_validation(synthesis))
        spans = StageSpans(__name__, "dit")
        try:
            events = faults.inject(self.engine.submit(synthesis), (PcmChunk, FileChunk, ItemDone), self.test_fault)
            async for event in events:
                message = convert.synthesize_event(event)
                spans.enter(_span_stage(message))
                yield message
        finally:  # the client went away (or the stream ended): nothing may keep running for it
            spans.close()
            self.engine.abort(synthesis.request_id)

    async def EncodeAudio(self, request: dit_pb2.EncodeAudioRequest, context) -> dit_pb2.EncodeAudioResponse:
        if not request.audio.data:
            raise InvalidArgument("audio is required: the bytes of a wav, flac, mp3 or ogg file", field="audio")
        encoded = await self.engine.encode_audio(request.audio.data)
        return convert.encode_audio_response(encoded)

    async def UploadLora(self, request_iterator: AsyncIterable[common_pb2.UploadLoraRequest],
                         context) -> common_pb2.UploadLoraResponse:
        try:  # client-streaming calls are not wrapped by the error interceptor: map typed errors here
            messages = aiter(request_iterator)
            header = await upload_header(messages)
            info, already = await self.engine.upload_lora(header.lora_id, header.adapter_config_json,
                                                          upload_chunks(messages), header.total_bytes)
            return common_pb2.UploadLoraResponse(lora=lora_info_to_pb(info), already_present=already)
        except AceStepError as error:
            await abort_with(context, error)

    async def ListLoras(self, request: common_pb2.ListLorasRequest, context) -> common_pb2.ListLorasResponse:
        infos, missing = await self.engine.list_loras(list(request.lora_ids))
        return common_pb2.ListLorasResponse(loras=[lora_info_to_pb(info) for info in infos], missing=missing)

    async def DeleteLora(self, request: common_pb2.DeleteLoraRequest, context) -> common_pb2.DeleteLoraResponse:
        await self.engine.delete_lora(request.lora_id)
        return common_pb2.DeleteLoraResponse(lora_id=request.lora_id)


async def upload_header(messages: AsyncIterator[common_pb2.UploadLoraRequest]) -> common_pb2.LoraUploadHeader:
    """The upload's first message, which must be its header."""
    first = await anext(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("an upload starts with its header (lora_id, adapter_config_json, total_bytes)",
                              field="header")
    return first.header


async def upload_chunks(messages: AsyncIterator[common_pb2.UploadLoraRequest]) -> AsyncIterator[bytes]:
    """The bytes of adapter_model.safetensors, from the messages after the header."""
    async for message in messages:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument("an upload sends one header, then only chunks", field="chunk")
        yield message.chunk


def lora_info_to_pb(info: LoraInfo) -> common_pb2.LoraInfo:
    return common_pb2.LoraInfo(lora_id=info.lora_id, rank=info.rank, alpha=info.alpha, targets=list(info.targets),
                               num_modules=info.num_modules, size_bytes=info.size_bytes, loaded=info.loaded)

