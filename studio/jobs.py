"""The page's link to the gateway: start a job, follow it, fetch its files (all through the SDK).

Every generation the page starts is a gateway job (:func:`gateway.sdk.submit`), followed with
:func:`gateway.sdk.watch`: the job keeps running when the browser goes away, and a reloaded page
follows it again from its id (the event log is replayed from the start, then followed live).
:meth:`GatewayLink.follow` turns the events into :class:`JobView` snapshots: the per-stage
progress, each finished item with its file on this machine (fetched as soon as the item is
done, so it plays while later items are still being made), and the resolved parameters.
Refusals come back as :class:`StudioError` carrying the gateway's status code and message.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import grpc

from gateway import sdk
from shared import convert
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.types import GenerationConfig, GenerationParams
from studio.progress import ProgressBoard

STAGE_NAMES = {
    common_pb2.STAGE_QUEUED: "queued",
    common_pb2.STAGE_LM_METADATA: "lm_metadata",
    common_pb2.STAGE_LM_CODES: "lm_codes",
    common_pb2.STAGE_CONDITIONING: "conditioning",
    common_pb2.STAGE_DIFFUSION: "diffusion",
    common_pb2.STAGE_DECODE: "decode",
    common_pb2.STAGE_ENCODE: "encode",
}
# How a refusal reads on the page, by gRPC status code.
ERROR_TITLES = {
    "INVALID_ARGUMENT": "Invalid input",
    "RESOURCE_EXHAUSTED": "The server is busy",
    "NOT_FOUND": "Not found",
    "UNAVAILABLE": "The gateway is unavailable",
    "DEADLINE_EXCEEDED": "Timed out",
    "CANCELLED": "Cancelled",
    "UNAUTHENTICATED": "Not authorised",
    "PERMISSION_DENIED": "Not authorised",
}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


class StudioError(Exception):
    """A refusal or failure to show to the user: the gateway's status code name and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def title(self) -> str:
        return ERROR_TITLES.get(self.code, "Error")

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "StudioError":
        return cls(error.code().name, error.details() or "")

    @classmethod
    def from_result_error(cls, error: Optional[str]) -> "StudioError":
        """The SDK's ``"CODE: message"`` error text."""
        code, _, message = (error or "UNKNOWN: failed").partition(": ")
        return cls(code, message) if message else cls("UNKNOWN", code)


@dataclass
class ItemView:
    item_index: int
    key: str
    seed: int
    duration_s: float
    audio_format: str
    audio_path: str
    params: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"item_index": self.item_index, "key": self.key, "seed": self.seed,
                "duration_s": self.duration_s, "format": self.audio_format, "audio_path": self.audio_path}


@dataclass
class JobView:
    """What the page shows of one job."""

    request_id: str
    board: ProgressBoard = field(default_factory=ProgressBoard)
    items: dict[int, ItemView] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)       # resolved, once the job is done
    extra: dict[str, Any] = field(default_factory=dict)        # lm_metadata, time_costs
    num_items: int = 0
    is_done: bool = False

    def record(self, item_index: Optional[int] = None) -> dict[str, Any]:
        """The parameters JSON of the result (v1's shape: the first item's ``audio_path`` and
        every item's seed in ``actual_seeds``); ``item_index`` picks the item it points at."""
        if item_index is None:
            item_index = min(self.items) if self.items else 0
        item = self.items.get(item_index)
        params = item.params if item else self.params  # an item's own: its seed and codes
        return {"request_id": self.request_id, "item_index": item_index,
                "audio_path": item.audio_path if item else "", "format": item.audio_format if item else "",
                "actual_seeds": [self.items[i].seed for i in sorted(self.items)],
                "items": [self.items[i].record() for i in sorted(self.items)],
                "params": params, **self.extra}


def params_record(message: Any) -> dict[str, Any]:
    """A GenerationParams message as JSON-ready values (uploads shown by their size)."""
    values = dataclasses.asdict(convert.params_from_pb(message))
    for name, value in values.items():
        if isinstance(value, (bytes, bytearray)):
            values[name] = f"<{len(value)} bytes>"
    return values


class GatewayLink:
    """The gateway as the page uses it. ``audio_dir`` holds the fetched files, one folder per job."""

    def __init__(self, client: sdk.AceStepClient, audio_dir: Path, min_update_s: float = 0.1) -> None:
        self.client = client
        self.audio_dir = audio_dir
        self.min_update_s = min_update_s

    def submit(self, params: GenerationParams, config: GenerationConfig) -> str:
        try:
            return sdk.submit(self.client, params, config)
        except grpc.RpcError as error:
            raise StudioError.from_rpc(error) from None
        except OSError as error:  # an upload path that cannot be read
            raise StudioError("INVALID_ARGUMENT", f"cannot read the uploaded audio: {error}") from None

    def follow(self, request_id: str) -> Iterator[JobView]:
        """Snapshots of the job as its events arrive (at most one per ``min_update_s`` within a
        stage; every stage change, finished item and the end are always reported). The last one
        has ``is_done``; a failed job raises :class:`StudioError` after its last snapshot."""
        view = JobView(request_id, ProgressBoard(request_id))
        last_shown = 0.0
        try:
            for event in sdk.watch(self.client, request_id):
                kind = event.WhichOneof("event")
                important = self._apply(view, event, kind)
                if kind == "failed":
                    error = event.failed.error
                    view.board.fail(error.message)
                    yield view
                    raise StudioError(error.code or "UNKNOWN", error.message)
                now = time.monotonic()
                if important or now - last_shown >= self.min_update_s:
                    last_shown = now
                    yield view
        except grpc.RpcError as error:
            raise StudioError.from_rpc(error) from None

    def _apply(self, view: JobView, event: gw.GenerateEvent, kind: str) -> bool:
        """Fold one event into the view; True when the page must show it at once."""
        if kind == "accepted":
            view.board.accepted(event.accepted.request_id, event.accepted.queue_position)
            return True
        if kind == "progress":
            progress = event.progress
            name = STAGE_NAMES.get(progress.stage, "")
            return view.board.advance(name, progress.fraction, progress.current, progress.total, progress.message)
        if kind == "lm_result":
            view.num_items = max(view.num_items, len(event.lm_result.codes))
            return False
        if kind == "item_finished":
            item = self._item(view.request_id, event.item_finished)
            view.items[item.item_index] = item
            view.board.item_ready(len(view.items), max(view.num_items, len(view.items)))
            return True
        if kind == "result":
            self._finish(view, event.result)
            return True
        return False

    def _item(self, request_id: str, item: gw.AudioItem) -> ItemView:
        audio_format = convert.AUDIO_FORMAT_FROM_PB.get(item.format, "flac")
        path = self.audio_file(request_id, item.item_index, audio_format)
        return ItemView(item.item_index, item.key, item.seed, item.duration_s, audio_format, str(path),
                        params_record(item.params))

    def _finish(self, view: JobView, result: gw.GenerateResult) -> None:
        view.params = params_record(result.params)
        view.extra = {"lm_metadata": dataclasses.asdict(convert.metadata_from_pb(result.lm_metadata)),
                      "time_costs": dict(result.time_costs.seconds)}
        view.board.item_ready(len(view.items), len(view.items))
        view.board.finish()
        view.is_done = True

    def audio_file(self, request_id: str, item_index: int, audio_format: str) -> Path:
        """A finished item's file on this machine (fetched once)."""
        folder = self.audio_dir / _SAFE_ID.sub("_", request_id)
        path = folder / f"item{item_index}.{sdk.FORMAT_EXTENSIONS.get(audio_format, audio_format)}"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(path.suffix + ".part")
            partial.write_bytes(self.audio_bytes(request_id, item_index))
            partial.replace(path)
        return path

    def audio_bytes(self, request_id: str, item_index: int) -> bytes:
        request = gw.GetAudioRequest(request_id=request_id, item_index=item_index)
        try:
            chunks = self.client.stub().GetAudio(request, timeout=self.client.timeout_s,
                                                 metadata=self.client.metadata())
            return b"".join(chunk.data for chunk in chunks)
        except grpc.RpcError as error:
            raise StudioError.from_rpc(error) from None

    def lm_call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """One of the SDK's LM helpers (create_sample, format_sample, understand_music); a
        failure raises :class:`StudioError`."""
        result = function(self.client, *args, **kwargs)
        if not result.success:
            raise StudioError.from_result_error(result.error)
        return result
