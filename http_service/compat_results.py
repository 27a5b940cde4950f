"""``/query_result`` entries built from a job (GetJob) and its event log (Watch from the start).

Each task is ``{"task_id", "status", "result", "progress_text"}`` with ``status`` 0 (queued or
running), 1 (succeeded) or 2 (failed or cancelled), and ``result`` a JSON *string* holding a list:
one object per audio file when the task succeeded (``file`` URL, ``metas``, ``seed_value``, model
names...), else one object with the task's ``progress`` (0..1 over the whole pipeline) and
``stage``, plus ``error`` when it failed — the shapes of ACE-Step's REST server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from gateway.sdk import overall_fraction
from shared import convert
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw

RESULT_ENV = "development"  # the ``env`` value of upstream's results
NOT_AVAILABLE = "N/A"       # upstream's value for metadata nobody set or planned
STATUS_RUNNING, STATUS_SUCCEEDED, STATUS_FAILED = 0, 1, 2
_STATUS = {gw.JOB_STATE_SUCCEEDED: STATUS_SUCCEEDED, gw.JOB_STATE_FAILED: STATUS_FAILED,
           gw.JOB_STATE_CANCELLED: STATUS_FAILED}
STAGE_NAMES = {
    common_pb2.STAGE_QUEUED: "queued", common_pb2.STAGE_LM_METADATA: "lm_metadata",
    common_pb2.STAGE_LM_CODES: "lm_codes", common_pb2.STAGE_CONDITIONING: "conditioning",
    common_pb2.STAGE_DIFFUSION: "diffusion", common_pb2.STAGE_DECODE: "decode", common_pb2.STAGE_ENCODE: "encode",
}
FileUrl = Callable[[int, str], str]  # (item_index, audio format) -> URL


@dataclass(frozen=True)
class ModelNames:
    lm_model: str = ""
    dit_model: str = ""


def task_status(job: gw.Job) -> int:
    return _STATUS.get(job.state, STATUS_RUNNING)


def _dumps(entries: list[dict[str, Any]]) -> str:
    return json.dumps(entries, ensure_ascii=False)


def missing_task(task_id: str) -> dict[str, Any]:
    """A task the gateway does not know (never submitted, expired, or another key's): failed, so a
    polling client stops (upstream reports such ids as running forever)."""
    message = "no such task (unknown id, expired, or submitted with another API key)"
    entry = {"file": "", "wave": "", "status": STATUS_FAILED, "create_time": 0, "env": RESULT_ENV,
             "progress": 0.0, "stage": "failed", "error": message}
    return {"task_id": task_id, "result": _dumps([entry]), "status": STATUS_FAILED, "progress_text": message}


def task_entry(task_id: str, job: gw.Job, events: list[gw.GenerateEvent], file_url: FileUrl,
               models: ModelNames) -> dict[str, Any]:
    status = task_status(job)
    base = {"file": "", "wave": "", "status": status, "create_time": int(job.created_unix_s), "env": RESULT_ENV}
    if status == STATUS_SUCCEEDED:
        items, text = _succeeded(base, job, events, file_url, models)
        return {"task_id": task_id, "result": _dumps(items), "status": status, "progress_text": text}
    if status == STATUS_FAILED:
        error = _failure(job, events)
        entry = {**base, "progress": _progress(events)[0], "stage": "failed", "error": error}
        return {"task_id": task_id, "result": _dumps([entry]), "status": status, "progress_text": error}
    fraction, stage, text = _progress(events)
    entry = {**base, "progress": fraction, "stage": stage}
    return {"task_id": task_id, "result": _dumps([entry]), "status": status, "progress_text": text}


def _progress(events: list[gw.GenerateEvent]) -> tuple[float, str, str]:
    """``(overall fraction, stage name, text)`` of the last progress event (queued before any)."""
    last: Optional[common_pb2.Progress] = None
    for event in events:
        if event.WhichOneof("event") == "progress":
            last = event.progress
    if last is None:
        return 0.0, "queued", "queued"
    stage = STAGE_NAMES.get(last.stage, "running")
    counted = f"{stage} {last.current}/{last.total}" if last.total else stage
    return round(overall_fraction(last), 4), stage, last.message or counted


def _failure(job: gw.Job, events: list[gw.GenerateEvent]) -> str:
    for event in reversed(events):
        if event.WhichOneof("event") == "failed":
            detail = event.failed.error
            where = f" (stage {detail.stage})" if detail.stage else ""
            return f"{detail.code}: {detail.message}{where}" if detail.code else detail.message
    return job.error or "the task failed"


def _succeeded(base: dict[str, Any], job: gw.Job, events: list[gw.GenerateEvent], file_url: FileUrl,
               models: ModelNames) -> tuple[list[dict[str, Any]], str]:
    result = next((e.result for e in reversed(events) if e.WhichOneof("event") == "result"), None)
    items = list(result.audios) if result is not None else [
        e.item_finished for e in events if e.WhichOneof("event") == "item_finished"]
    items.sort(key=lambda item: item.item_index)
    formats = {f.item_index: f.format for f in job.files}
    params = result.params if result is not None else common_pb2.GenerationParams()
    lm_meta = result.lm_metadata if result is not None else common_pb2.MusicMetadata()
    seed_value = ",".join(str(item.seed) for item in items)
    shared = {"prompt": params.caption, "lyrics": params.lyrics, "metas": _metas(params, lm_meta, items),
              "generation_info": _generation_info(result, items, params), "seed_value": seed_value,
              "lm_model": models.lm_model, "dit_model": models.dit_model, "progress": 1.0, "stage": "succeeded"}
    entries = []
    for item in items or [None]:
        url = ""
        if item is not None:
            audio_format = formats.get(item.item_index) or item.format
            url = file_url(item.item_index, convert.AUDIO_FORMAT_FROM_PB.get(audio_format, "flac"))
        entries.append({**base, "file": url, **shared})
    return entries, result.status_message if result is not None else "succeeded"


def _metas(params: common_pb2.GenerationParams, lm: common_pb2.MusicMetadata, items: list[gw.AudioItem]) -> dict:
    """Song metadata: the request's value, else the LM's, else ``N/A`` (upstream's convention)."""
    def pick(*candidates: Any) -> Any:
        return next((value for value in candidates if value not in (None, "", 0)), NOT_AVAILABLE)

    duration = params.duration if params.duration > 0 else None
    return {
        "bpm": pick(params.bpm if params.HasField("bpm") else None, params.cot_bpm if params.HasField("cot_bpm") else None,
                    lm.bpm if lm.HasField("bpm") else None),
        "duration": pick(duration, params.cot_duration if params.HasField("cot_duration") else None,
                         lm.duration if lm.HasField("duration") else None, items[0].duration_s if items else None),
        "genres": pick(", ".join(lm.genres)),
        "keyscale": pick(params.keyscale, params.cot_keyscale, lm.keyscale),
        "timesignature": pick(params.timesignature, params.cot_timesignature, lm.timesignature),
    }


def _generation_info(result: Optional[gw.GenerateResult], items: list[gw.AudioItem],
                     params: common_pb2.GenerationParams) -> str:
    steps = len(params.timesteps.values) if params.HasField("timesteps") else params.inference_steps
    parts = [f"{len(items)} audio(s), {steps} step(s), seeds {','.join(str(i.seed) for i in items) or '-'}"]
    seconds = dict(result.time_costs.seconds) if result is not None else {}
    for key, label in (("lm_total_time", "LM"), ("dit_total_time_cost", "DiT"), ("pipeline_total_time", "total")):
        if key in seconds:
            parts.append(f"{label} {seconds[key]:.2f} s")
    return "; ".join(parts)
