"""Python SDK: the public ACE-Step API on top of a gateway.

``generate_music(client, params, config, save_dir=None, progress=None)``, ``understand_music``,
``create_sample`` and ``format_sample`` keep the seed API's signatures, with an
:class:`AceStepClient` in place of the two handlers. Failures come back as ``success=False`` with
``error`` set. :func:`stream_generate` yields the raw events for frontends (asyncio). Every
generation is a job on the gateway: :func:`submit` starts one and returns its id, :func:`watch`
follows it (resumable by sequence number) and :func:`get_result` collects it. LoRA adapters:
:func:`upload_lora`, :func:`list_loras`, :func:`delete_lora`; a request selects them with
``params.lora_id``/``lora_scale`` and blends more with ``params.loras``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import grpc

from shared import convert
from shared.audio import decode_audio
from shared.errors import AceStepError
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.pb.acestep.gateway.v1 import gateway_pb2_grpc
from shared.types import (
    AudioOutput,
    CreateSampleParams,
    CreateSampleResult,
    FormatSampleParams,
    FormatSampleResult,
    GenerationConfig,
    GenerationParams,
    GenerationResult,
    MusicMetadata,
    UnderstandParams,
    UnderstandResult,
)

ProgressFn = Callable[..., Any]
_STAGE_SPAN = {  # stage -> (start, end) of the overall progress bar
    common_pb2.STAGE_QUEUED: (0.0, 0.02),
    common_pb2.STAGE_LM_METADATA: (0.02, 0.1),
    common_pb2.STAGE_LM_CODES: (0.1, 0.4),
    common_pb2.STAGE_CONDITIONING: (0.4, 0.45),
    common_pb2.STAGE_DIFFUSION: (0.45, 0.85),
    common_pb2.STAGE_DECODE: (0.85, 0.95),
    common_pb2.STAGE_ENCODE: (0.95, 1.0),
}
FORMAT_EXTENSIONS = {"flac": "flac", "wav": "wav", "mp3": "mp3", "ogg": "ogg"}


@dataclass
class AceStepClient:
    """Connection settings for a gateway (``host:port``)."""

    target: str = "127.0.0.1:50050"
    api_key: Optional[str] = None
    root_certificates: Optional[bytes] = None     # set to use TLS
    timeout_s: Optional[float] = None             # per call deadline
    _channel: Any = field(default=None, init=False, repr=False)

    def metadata(self) -> list[tuple[str, str]]:
        return [("x-api-key", self.api_key)] if self.api_key else []

    def _credentials(self) -> Optional[grpc.ChannelCredentials]:
        if self.root_certificates is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def stub(self) -> gateway_pb2_grpc.GatewayServiceStub:
        if self._channel is None:
            options = [("grpc.max_receive_message_length", 320 * 1024 * 1024),
                       ("grpc.max_send_message_length", 320 * 1024 * 1024)]
            creds = self._credentials()
            self._channel = (grpc.secure_channel(self.target, creds, options) if creds
                             else grpc.insecure_channel(self.target, options))
        return gateway_pb2_grpc.GatewayServiceStub(self._channel)

    def aio_stub(self) -> tuple[grpc.aio.Channel, gateway_pb2_grpc.GatewayServiceStub]:
        """A fresh asyncio channel and stub (close the channel when done)."""
        creds = self._credentials()
        channel = grpc.aio.secure_channel(self.target, creds) if creds else grpc.aio.insecure_channel(self.target)
        return channel, gateway_pb2_grpc.GatewayServiceStub(channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def _upload(source: Any) -> Optional[bytes]:
    """A client-side path is read here; bytes pass through; the server never sees a path."""
    if source is None or isinstance(source, (bytes, bytearray)):
        return source
    return Path(os.fspath(source)).expanduser().read_bytes()


def build_request(params: GenerationParams, config: GenerationConfig, stream_pcm: bool = False,
                  request_id: str = "") -> gw.GenerateRequest:
    params = dataclasses.replace(params, src_audio=_upload(params.src_audio),
                                 reference_audio=_upload(params.reference_audio))
    return gw.GenerateRequest(request_id=request_id, params=convert.params_to_pb(params),
                              config=convert.config_to_pb(config), stream_pcm=stream_pcm)


def overall_fraction(progress: common_pb2.Progress) -> float:
    start, end = _STAGE_SPAN.get(progress.stage, (0.0, 1.0))
    return start + (end - start) * min(max(progress.fraction, 0.0), 1.0)


def _error_text(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


class _Collector:
    """Assembles files and results from the event stream."""

    def __init__(self, config: GenerationConfig, save_dir: Optional[str], progress: Optional[ProgressFn]) -> None:
        self.config = config
        self.save_dir = Path(save_dir) if save_dir else None
        self.progress = progress
        self.files: dict[int, bytearray] = {}
        self.audios: dict[int, AudioOutput] = {}
        self.result: Optional[gw.GenerateResult] = None

    def feed(self, event: gw.GenerateEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "progress" and self.progress is not None:
            self.progress(overall_fraction(event.progress), desc=event.progress.message)
        elif kind == "file":
            self.files.setdefault(event.file.item_index, bytearray()).extend(event.file.data)
        elif kind == "item_finished":
            self.audios[event.item_finished.item_index] = self._finish_item(event.item_finished)
        elif kind == "result":
            self.result = event.result

    def _finish_item(self, item: gw.AudioItem) -> AudioOutput:
        import torch

        data = bytes(self.files.pop(item.item_index, b""))
        waveform, sample_rate = decode_audio(data, field="audio")
        path = ""
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            ext = FORMAT_EXTENSIONS.get(self.config.audio_format, self.config.audio_format)
            path = str(self.save_dir / f"{item.key}.{ext}")
            Path(path).write_bytes(data)
        params = dataclasses.asdict(convert.params_from_pb(item.params))
        return AudioOutput(path=path, tensor=torch.from_numpy(waveform).float(), key=item.key,
                           sample_rate=sample_rate, params=params)

    def to_result(self) -> GenerationResult:
        if self.result is None:
            return GenerationResult(success=False, error="the stream ended without a result")
        lm_metadata = dataclasses.asdict(convert.metadata_from_pb(self.result.lm_metadata))
        extra = {"lm_metadata": lm_metadata, "time_costs": dict(self.result.time_costs.seconds),
                 "params": dataclasses.asdict(convert.params_from_pb(self.result.params))}
        audios = [self.audios[index] for index in sorted(self.audios)]
        return GenerationResult(audios=audios, status_message=self.result.status_message,
                                extra_outputs=extra, success=True, error=None)


def generate_music(client: AceStepClient, params: GenerationParams, config: GenerationConfig,
                   save_dir: Optional[str] = None, progress: Optional[ProgressFn] = None,
                   on_event: Optional[Callable[[gw.GenerateEvent], None]] = None) -> GenerationResult:
    """Generate music through the gateway; audio files are written to ``save_dir`` when given.
    ``progress(fraction, desc=...)`` gets the overall progress; ``on_event`` every raw event."""
    collector = _Collector(config, save_dir, progress)
    try:
        request = build_request(params, config)
        for event in client.stub().Generate(request, timeout=client.timeout_s, metadata=client.metadata()):
            if on_event is not None:
                on_event(event)
            collector.feed(event)
    except grpc.RpcError as error:
        return GenerationResult(success=False, error=_error_text(error), status_message=f"Error: {error.details()}")
    except AceStepError as error:  # refused on the client side, e.g. an unknown audio_format
        return GenerationResult(success=False, error=f"{error.grpc_code_name}: {error.message}",
                                status_message=f"Error: {error.message}")
    except (OSError, ValueError) as error:
        return GenerationResult(success=False, error=str(error), status_message=f"Error: {error}")
    return collector.to_result()


def submit(client: AceStepClient, params: GenerationParams, config: GenerationConfig) -> str:
    """Start a generation as a job and return its id at once (``grpc.RpcError`` when refused).
    The job runs whether or not anybody watches it; follow it with :func:`watch` or collect it
    with :func:`get_result`, from this process or any other, until the gateway's retention ends."""
    reply = client.stub().Submit(build_request(params, config), timeout=client.timeout_s, metadata=client.metadata())
    return reply.request_id


def watch(client: AceStepClient, request_id: str, after_sequence: int = 0) -> Iterator[gw.GenerateEvent]:
    """A job's events numbered above ``after_sequence`` (replayed), then live ones until it ends.
    Each event carries its ``sequence``: pass the last one seen to resume after a dropped stream."""
    yield from client.stub().Watch(gw.WatchRequest(request_id=request_id, after_sequence=after_sequence),
                                   metadata=client.metadata())


def get_result(client: AceStepClient, request_id: str, save_dir: Optional[str] = None,
               progress: Optional[ProgressFn] = None,
               on_event: Optional[Callable[[gw.GenerateEvent], None]] = None) -> GenerationResult:
    """Wait for a job and return it as :func:`generate_music` would (files fetched from the gateway)."""
    collector = _Collector(GenerationConfig(), save_dir, progress)
    try:
        for event in watch(client, request_id):
            if on_event is not None:
                on_event(event)
            kind = event.WhichOneof("event")
            if kind == "failed":
                detail = event.failed.error
                return GenerationResult(success=False, error=f"{detail.code}: {detail.message}",
                                        status_message=f"Error: {detail.message}")
            if kind == "item_finished":
                item = event.item_finished
                collector.config = dataclasses.replace(
                    collector.config, audio_format=convert.AUDIO_FORMAT_FROM_PB.get(item.format, "flac"))
                chunks = client.stub().GetAudio(gw.GetAudioRequest(request_id=request_id, item_index=item.item_index),
                                                metadata=client.metadata())
                collector.files[item.item_index] = bytearray(b"".join(chunk.data for chunk in chunks))
            collector.feed(event)
    except grpc.RpcError as error:
        return GenerationResult(success=False, error=_error_text(error), status_message=f"Error: {error.details()}")
    return collector.to_result()


async def stream_generate(client: AceStepClient, params: GenerationParams, config: GenerationConfig,
                          stream_pcm: bool = True) -> AsyncIterator[gw.GenerateEvent]:
    """The raw event stream (accepted, progress, LM result, PCM chunks, files, result) for frontends.
    Closing the iterator cancels the request end to end."""
    channel, stub = client.aio_stub()
    call = stub.Generate(build_request(params, config, stream_pcm), timeout=client.timeout_s,
                         metadata=client.metadata())
    try:
        async for event in call:
            yield event
    finally:
        call.cancel()
        await channel.close()


def _call_lm(client: AceStepClient, method: str, request: Any, result_cls: type) -> Any:
    try:
        reply = getattr(client.stub(), method)(request, timeout=client.timeout_s, metadata=client.metadata())
    except grpc.RpcError as error:
        return result_cls(success=False, error=_error_text(error), status_message=f"Error: {error.details()}")
    result = convert.simple_from_pb(reply.result, result_cls)
    result.success, result.error = True, None
    return result


def understand_music(client: AceStepClient, audio_codes: str = "", temperature: float = 0.85,
                     top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                     use_constrained_decoding: bool = True, constrained_decoding_debug: bool = False,
                     audio: Optional[Any] = None) -> UnderstandResult:
    """Audio codes (or an audio file, encoded by the DiT) → caption, lyrics and metadata."""
    params = UnderstandParams(audio_codes, temperature, top_k or 0, top_p if top_p else 1.0, repetition_penalty,
                              use_constrained_decoding, constrained_decoding_debug)
    request = gw.UnderstandRequest(params=convert.simple_to_pb(params, common_pb2.UnderstandParams))
    if audio is not None:
        request.audio.data = _upload(audio)
    return _call_lm(client, "Understand", request, UnderstandResult)


def create_sample(client: AceStepClient, query: str, instrumental: bool = False,
                  vocal_language: Optional[str] = None, temperature: float = 0.85, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                  use_constrained_decoding: bool = True, constrained_decoding_debug: bool = False
                  ) -> CreateSampleResult:
    """A natural-language query → caption, lyrics and metadata."""
    params = CreateSampleParams(query, instrumental, vocal_language or "unknown", temperature, top_k or 0,
                                top_p if top_p else 1.0, repetition_penalty, use_constrained_decoding,
                                constrained_decoding_debug)
    request = gw.CreateSampleRequest(params=convert.simple_to_pb(params, common_pb2.CreateSampleParams))
    return _call_lm(client, "CreateSample", request, CreateSampleResult)


def format_sample(client: AceStepClient, caption: str, lyrics: str,
                  user_metadata: Optional[dict[str, Any]] = None, temperature: float = 0.85,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                  use_constrained_decoding: bool = True, constrained_decoding_debug: bool = False
                  ) -> FormatSampleResult:
    """Caption + lyrics (+ metadata to respect) → enhanced caption and metadata."""
    meta = user_metadata or {}
    metadata = MusicMetadata(bpm=meta.get("bpm"), keyscale=meta.get("keyscale", ""),
                             timesignature=str(meta.get("timesignature", "") or ""),
                             duration=meta.get("duration"), language=meta.get("language", ""))
    params = FormatSampleParams(caption, lyrics, metadata, temperature, top_k or 0, top_p if top_p else 1.0,
                                repetition_penalty, use_constrained_decoding, constrained_decoding_debug)
    request = gw.FormatSampleRequest(params=convert.simple_to_pb(params, common_pb2.FormatSampleParams))
    return _call_lm(client, "FormatSample", request, FormatSampleResult)


LORA_CHUNK_BYTES = 1024 * 1024


def _lora_dict(info: common_pb2.LoraInfo) -> dict[str, Any]:
    return {"lora_id": info.lora_id, "rank": info.rank, "alpha": info.alpha, "targets": list(info.targets),
            "num_modules": info.num_modules, "size_bytes": info.size_bytes, "loaded_on": list(info.loaded_on)}


def upload_lora(client: AceStepClient, lora_id: str, folder: Any) -> dict[str, Any]:
    """Upload a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``, as the
    reference trainer saves it) under ``lora_id``; returns its info (``grpc.RpcError`` when refused,
    e.g. INVALID_ARGUMENT naming the adapter key that does not fit the model)."""
    folder = Path(os.fspath(folder)).expanduser()
    config = (folder / "adapter_config.json").read_text(encoding="utf-8")
    weights = (folder / "adapter_model.safetensors").read_bytes()
    header = common_pb2.LoraUploadHeader(lora_id=lora_id, adapter_config_json=config, total_bytes=len(weights))

    def messages() -> Iterator[common_pb2.UploadLoraRequest]:
        yield common_pb2.UploadLoraRequest(header=header)
        for start in range(0, len(weights), LORA_CHUNK_BYTES):
            yield common_pb2.UploadLoraRequest(chunk=weights[start:start + LORA_CHUNK_BYTES])

    reply = client.stub().UploadLora(messages(), timeout=client.timeout_s, metadata=client.metadata())
    return {**_lora_dict(reply.lora), "already_present": reply.already_present}


def list_loras(client: AceStepClient, lora_ids: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The adapters the DiT replicas know (only ``lora_ids`` when given), with where they are loaded."""
    reply = client.stub().ListLoras(common_pb2.ListLorasRequest(lora_ids=list(lora_ids)), timeout=client.timeout_s,
                                    metadata=client.metadata())
    return [_lora_dict(info) for info in reply.loras]


def delete_lora(client: AceStepClient, lora_id: str) -> None:
    """Delete an adapter from every DiT replica (``grpc.RpcError`` NOT_FOUND when none had it)."""
    client.stub().DeleteLora(common_pb2.DeleteLoraRequest(lora_id=lora_id), timeout=client.timeout_s,
                             metadata=client.metadata())


# Studio operations (docs/studio.md). A ``source`` is a finished item of yours, ``(request_id,
# item_index)``, or audio: a client-side path or the file's bytes. Each returns what generate_music does.
Source = Any


def _source_fields(source: Source) -> dict[str, Any]:
    if isinstance(source, tuple):
        request_id, item_index = source
        return {"source_request_id": request_id, "source_item_index": int(item_index)}
    return {"src_audio": source}  # a path is read when the request is built


def retake(client: AceStepClient, request_id: str, item_index: int = 0, retake_seeds: Any = None,
           retake_variance: float = 0.5, save_dir: Optional[str] = None, audio_format: str = "flac",
           progress: Optional[ProgressFn] = None, on_event: Optional[Callable[[gw.GenerateEvent], None]] = None,
           src_audio: Any = None, reference_audio: Any = None) -> GenerationResult:
    """Item ``item_index`` of job ``request_id`` again, one item per retake seed (None: one random seed):
    its noise mixed with each seed's by ``retake_variance`` (0: the same item, 1: a new seed), all
    else the original's. An item made from an upload needs that ``src_audio`` again."""
    seeds = [retake_seeds] if isinstance(retake_seeds, int) else list(retake_seeds or [-1])
    params = GenerationParams(task_type="retake", source_request_id=request_id, source_item_index=item_index,
                              retake_seeds=seeds, retake_variance=retake_variance, src_audio=src_audio,
                              reference_audio=reference_audio)
    config = GenerationConfig(batch_size=len(seeds), audio_format=audio_format)
    return generate_music(client, params, config, save_dir=save_dir, progress=progress, on_event=on_event)


def extend(client: AceStepClient, source: Source, left_seconds: float = 0.0, right_seconds: float = 0.0,
           params: Optional[GenerationParams] = None, config: Optional[GenerationConfig] = None,
           save_dir: Optional[str] = None, progress: Optional[ProgressFn] = None,
           on_event: Optional[Callable[[gw.GenerateEvent], None]] = None) -> GenerationResult:
    """``left_seconds`` of new music before ``source`` and ``right_seconds`` after it, in one pass; the
    source in between is kept. ``params`` may set the caption, lyrics and sampler (a finished item's
    caption, lyrics and metadata are used for those left unset)."""
    params = dataclasses.replace(params or GenerationParams(), task_type="extend", extend_left_seconds=left_seconds,
                                 extend_right_seconds=right_seconds, **_source_fields(source))
    return generate_music(client, params, config or GenerationConfig(batch_size=1), save_dir=save_dir,
                          progress=progress, on_event=on_event)


def edit(client: AceStepClient, source: Source, mode: str = "only_lyrics", target_caption: str = "",
         target_lyrics: str = "", n_min: float = 0.0, n_max: float = 1.0, params: Optional[GenerationParams] = None,
         config: Optional[GenerationConfig] = None, save_dir: Optional[str] = None,
         progress: Optional[ProgressFn] = None,
         on_event: Optional[Callable[[gw.GenerateEvent], None]] = None) -> GenerationResult:
    """``source`` with new lyrics (``only_lyrics``) or a new caption (``remix``), by a flow-matching edit
    over the slice ``[n_min, n_max]`` of the trajectory (0 = the data end; ``n_max = 0`` changes
    nothing). ``params.caption``/``lyrics`` describe the source (a finished item's are used when unset)."""
    params = dataclasses.replace(params or GenerationParams(), task_type="edit", edit_mode=mode,
                                 edit_target_caption=target_caption, edit_target_lyrics=target_lyrics,
                                 edit_n_min=n_min, edit_n_max=n_max, **_source_fields(source))
    return generate_music(client, params, config or GenerationConfig(batch_size=1), save_dir=save_dir,
                          progress=progress, on_event=on_event)


__all__ = [
    "AceStepClient", "GenerationParams", "GenerationConfig", "GenerationResult", "UnderstandResult",
    "CreateSampleResult", "FormatSampleResult", "generate_music", "stream_generate", "understand_music",
    "create_sample", "format_sample", "submit", "watch", "get_result", "upload_lora", "list_loras", "delete_lora",
    "retake", "extend", "edit",
]
