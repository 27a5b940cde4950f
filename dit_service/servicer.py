"""DitService: thin translations onto the DiT engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

from dit_service import convert
from dit_service.engine import DitEngine
from dit_service.events import FileChunk, ItemDone, PcmChunk
from shared import faults
from shared.errors import InvalidArgument
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
