"""Understand, create_sample and format_sample: validated, then passed to an LM replica.

Understand also accepts uploaded audio: the DiT service encodes it to audio codes first.
"""

from __future__ import annotations

from typing import Optional

from gateway.orchestrator import BackendCaller, Deadline
from shared import convert
from shared.audio_codes import format_codes
from shared.errors import NotReady
from shared.pb.acestep.dit.v1 import dit_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.lm.v1 import lm_pb2
from shared.types import CreateSampleParams, FormatSampleParams, UnderstandParams
from shared.validation import validate_create_sample, validate_format_sample, validate_understand


class LmPassthrough:
    def __init__(self, lm: Optional[BackendCaller], dit: BackendCaller, max_audio_bytes: int) -> None:
        self.lm = lm
        self.dit = dit
        self.max_audio_bytes = max_audio_bytes

    def _require_lm(self) -> BackendCaller:
        if self.lm is None:
            raise NotReady("this gateway has no LM service configured (--lm)")
        return self.lm

    async def understand(self, request: gw.UnderstandRequest, deadline: Deadline) -> gw.UnderstandResponse:
        lm = self._require_lm()
        params = request.params
        validate_understand(convert.simple_from_pb(params, UnderstandParams))
        if request.HasField("audio") and not params.audio_codes.strip():
            from gateway.orchestrator import check_uploads
            from shared.pb.acestep.common.v1 import common_pb2

            check_uploads(common_pb2.GenerationParams(src_audio=request.audio), self.max_audio_bytes)
            encoded = await self.dit.unary(
                "EncodeAudio", dit_pb2.EncodeAudioRequest(request_id=request.request_id, audio=request.audio),
                deadline)
            params.audio_codes = format_codes(list(encoded.codes))
        reply = await lm.unary("Understand", lm_pb2.UnderstandRequest(request_id=request.request_id,
                                                                      params=params), deadline)
        return gw.UnderstandResponse(result=reply.result)

    async def create_sample(self, request: gw.CreateSampleRequest, deadline: Deadline) -> gw.CreateSampleResponse:
        lm = self._require_lm()
        validate_create_sample(convert.simple_from_pb(request.params, CreateSampleParams))
        reply = await lm.unary("CreateSample", lm_pb2.CreateSampleRequest(request_id=request.request_id,
                                                                          params=request.params), deadline)
        return gw.CreateSampleResponse(result=reply.result)

    async def format_sample(self, request: gw.FormatSampleRequest, deadline: Deadline) -> gw.FormatSampleResponse:
        lm = self._require_lm()
        validate_format_sample(convert.simple_from_pb(request.params, FormatSampleParams))
        reply = await lm.unary("FormatSample", lm_pb2.FormatSampleRequest(request_id=request.request_id,
                                                                          params=request.params), deadline)
        return gw.FormatSampleResponse(result=reply.result)
