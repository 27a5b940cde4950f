"""DitService: thin translations onto the DiT engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

from dit_service import convert
from dit_service.engine import DitEngine
from shared.errors import InvalidArgument
from shared.pb.acestep.dit.v1 import dit_pb2, dit_pb2_grpc
from shared.validation import validate_params


class DitServicer(dit_pb2_grpc.DitServiceServicer):
    def __init__(self, engine: DitEngine) -> None:
        self.engine = engine

    async def Synthesize(self, request: dit_pb2.SynthesizeRequest, context) -> AsyncIterator[dit_pb2.SynthesizeEvent]:
        synthesis = convert.synthesis_request(request, context.time_remaining())
        validate_params(convert.params_for_validation(synthesis))
        try:
            async for event in self.engine.submit(synthesis):
                yield convert.synthesize_event(event)
        finally:  # the client went away (or the stream ended): nothing may keep running for it
            self.engine.abort(synthesis.request_id)

    async def EncodeAudio(self, request: dit_pb2.EncodeAudioRequest, context) -> dit_pb2.EncodeAudioResponse:
        if not request.audio.data:
            raise InvalidArgument("audio is required: the bytes of a wav, flac, mp3 or ogg file", field="audio")
        encoded = await self.engine.encode_audio(request.audio.data)
        return convert.encode_audio_response(encoded)
