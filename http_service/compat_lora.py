"""ACE-Step's LoRA routes (``/v1/lora/load``, ``unload``, ``toggle``, ``scale``, ``status``) on the
gateway's adapter registry.

Upstream keeps one set of loaded adapters in its one model, shared by every client. Here adapters
live in the DiT replicas' registry (uploaded, or under the checkpoint's ``loras/`` folder) and any
request may name its own; what these routes edit is the calling API key's **LoRA default** (the
gateway's ``GetLoraDefault`` / ``SetLoraDefault``, kept in its job store): the adapters, with their
scales, blended into each of that key's generations that names no adapter, while enabled. So
"load" never reads a file: ``lora_path`` names a registry id, either bare or as the last component
of a path inside a ``loras`` folder (``checkpoints/loras/<id>``). The router in ``compat.py``
wraps the data these handlers return in the envelope; errors are ``HTTPException``s.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, HTTPException, Request

from http_service import compat_io as io
from http_service.compat_fields import FieldError, as_bool, as_float, as_str, show
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.validation import LORA_ID_PATTERN, LORA_SCALE_MAX, LORA_SCALE_MIN, MAX_LORAS_PER_REQUEST

MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 128
TOKEN_FIELDS = ("ai_token", "aiToken")
_SEPARATORS = re.compile(r"[\\/]+")

Handler = Callable[[Request], Awaitable[Any]]


def lora_id_from_path(lora_path: str) -> str:
    """The registry id ``lora_path`` names: a bare id, or ``.../loras/<id>`` (``/`` or ``\\``
    separators, a trailing separator allowed). Raises :class:`FieldError`; nothing is opened."""
    if len(lora_path) > MAX_PATH_CHARS:
        raise FieldError("lora_path", f"must be at most {MAX_PATH_CHARS} characters, got {len(lora_path)}")
    parts = [part for part in _SEPARATORS.split(lora_path.strip()) if part not in ("", ".")]
    if not parts or (len(parts) > 1 and parts[-2] != "loras"):
        raise FieldError("lora_path", "must be an adapter id (GET /v1/lora/status lists them) or a path ending in "
                                      f"loras/<id>; files are never read from a client's path, got {show(lora_path)}")
    if not LORA_ID_PATTERN.fullmatch(parts[-1]):
        raise FieldError("lora_path", f"{show(parts[-1])} is not an adapter id (letters, digits, '.', '_', '-')")
    return parts[-1]


def _name(entry: gw.DefaultLora) -> str:
    return entry.name or entry.lora_id


def _active(default: gw.LoraDefault) -> gw.DefaultLora:
    if not default.loras:
        raise HTTPException(400, detail="no LoRA adapter is loaded for this API key; load one with /v1/lora/load")
    return default.loras[-1]  # the last one loaded, as upstream activates the adapter it loads


def loaded(default: gw.LoraDefault, lora_id: str, adapter_name: str) -> gw.LoraDefault:
    """The default with ``lora_id`` added (scale 1.0, enabled), under ``adapter_name`` or its id."""
    name = adapter_name or lora_id
    for entry in default.loras:
        if _name(entry) == name:
            raise HTTPException(400, detail=f"adapter name already in use: {name!r}; unload first or pick another "
                                            "adapter_name")
        if entry.lora_id == lora_id:
            raise HTTPException(400, detail=f"adapter {lora_id!r} is already loaded as {_name(entry)!r}")
    if len(default.loras) >= MAX_LORAS_PER_REQUEST:
        raise HTTPException(400, detail=f"at most {MAX_LORAS_PER_REQUEST} adapters may be loaded at once")
    result = gw.LoraDefault(loras=list(default.loras), enabled=True)
    result.loras.append(gw.DefaultLora(lora_id=lora_id, scale=1.0, name=adapter_name if adapter_name != lora_id
                                       else ""))
    return result


def scaled(default: gw.LoraDefault, scale: float, adapter_name: str) -> tuple[gw.LoraDefault, str]:
    """The default with one adapter's scale set (the named one, else the active one) and its name."""
    result = gw.LoraDefault()
    result.CopyFrom(default)
    if not adapter_name:
        target = _active(result)
    else:
        matches = [e for e in result.loras if adapter_name in (_name(e), e.lora_id)]
        if not matches:
            names = ", ".join(repr(_name(e)) for e in result.loras) or "none"
            raise HTTPException(404, detail=f"adapter_name: no loaded adapter {adapter_name!r} (loaded: {names})")
        target = matches[0]
    target.scale = scale
    return result, _name(target)


def status_data(default: gw.LoraDefault, registry: common_pb2.ListLorasResponse) -> dict[str, Any]:
    """Upstream's status fields for the caller's default, plus ``loaded`` (name, id, scale of each)
    and ``available`` (the registry)."""
    entries = list(default.loras)
    return {
        "lora_loaded": bool(entries),
        "use_lora": bool(entries) and default.enabled,
        "lora_scale": entries[-1].scale if entries else 1.0,
        "adapter_type": "lora" if entries else None,
        "scales": {_name(e): e.scale for e in entries},
        "active_adapter": _name(entries[-1]) if entries else None,
        "adapters": [_name(e) for e in entries],
        "synthetic_default_mode": False,
        "loaded": [{"adapter_name": _name(e), "lora_id": e.lora_id, "scale": e.scale} for e in entries],
        "available": [{"lora_id": info.lora_id, "rank": info.rank, "alpha": info.alpha, "targets": list(info.targets),
                       "num_modules": info.num_modules, "size_bytes": info.size_bytes,
                       "loaded_on": list(info.loaded_on)} for info in registry.loras],
    }


# ---- request reading --------------------------------------------------------------------------------


async def _body(request: Request, fields: tuple[str, ...]) -> tuple[dict[str, Any], tuple]:
    body, _ = await io.read_body(request)
    for key in body:
        if key not in fields + TOKEN_FIELDS:
            raise HTTPException(400, detail=f"{show(key)}: unknown field; expected {', '.join(fields) or 'none'}")
    return body, io.caller_metadata(request, body)


def _required(body: dict[str, Any], name: str) -> Any:
    if body.get(name) in (None, ""):
        raise HTTPException(400, detail=f"{name}: required")
    return body[name]


def _adapter_name(body: dict[str, Any]) -> str:
    value = body.get("adapter_name")
    name = "" if value is None else as_str("adapter_name", value).strip()
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise FieldError("adapter_name", f"must be printable text of at most {MAX_NAME_CHARS} characters, "
                                         f"got {show(name)}")
    return name


async def _current(request: Request, metadata: tuple) -> gw.LoraDefault:
    reply = await io.unary(request, "GetLoraDefault", gw.GetLoraDefaultRequest(), metadata)
    return reply.lora_default


async def _store(request: Request, metadata: tuple, default: gw.LoraDefault) -> None:
    await io.unary(request, "SetLoraDefault", gw.SetLoraDefaultRequest(lora_default=default), metadata)


# ---- routes -------------------------------------------------------------------------------------------


async def load(request: Request) -> dict[str, Any]:
    body, metadata = await _body(request, ("lora_path", "adapter_name"))
    with io.bad_request():
        lora_path = as_str("lora_path", _required(body, "lora_path"))
        lora_id, adapter_name = lora_id_from_path(lora_path), _adapter_name(body)
    known = await io.unary(request, "ListLoras", common_pb2.ListLorasRequest(lora_ids=[lora_id]), metadata)
    if known.missing:
        raise HTTPException(404, detail=f"lora_path: no adapter {lora_id!r} (upload it, or place it under the "
                                        "checkpoint's loras/ folder; GET /v1/lora/status lists them)")
    await _store(request, metadata, loaded(await _current(request, metadata), lora_id, adapter_name))
    data = {"message": f"LoRA {adapter_name or lora_id!r} loaded as this API key's default", "lora_path": lora_path,
            "lora_id": lora_id}
    return {**data, "adapter_name": adapter_name} if adapter_name else data


async def unload(request: Request) -> dict[str, Any]:
    _, metadata = await _body(request, ())
    if not (await _current(request, metadata)).loras:
        return {"message": "no LoRA adapter was loaded; using the base model"}
    await _store(request, metadata, gw.LoraDefault())
    return {"message": "LoRA unloaded; this API key's generations use the base model"}


async def toggle(request: Request) -> dict[str, Any]:
    body, metadata = await _body(request, ("use_lora",))
    with io.bad_request():
        use_lora = as_bool("use_lora", _required(body, "use_lora"))
    default = await _current(request, metadata)
    if use_lora:
        _active(default)  # refuses when nothing is loaded
    if default.loras:
        default.enabled = use_lora
        await _store(request, metadata, default)
    return {"message": f"LoRA {'enabled' if use_lora else 'disabled'}", "use_lora": use_lora}


async def scale(request: Request) -> dict[str, Any]:
    body, metadata = await _body(request, ("scale", "adapter_name"))
    with io.bad_request():
        value = as_float("scale", _required(body, "scale"))
        adapter_name = _adapter_name(body)
    if not LORA_SCALE_MIN <= value <= LORA_SCALE_MAX:
        raise HTTPException(400, detail=f"scale: must be in [{LORA_SCALE_MIN}, {LORA_SCALE_MAX}], got {value}")
    default, name = scaled(await _current(request, metadata), value, adapter_name)
    await _store(request, metadata, default)
    data = {"message": f"LoRA {name!r} scale set to {value}", "scale": value}
    return {**data, "adapter_name": adapter_name} if adapter_name else data


async def status(request: Request) -> dict[str, Any]:
    metadata = io.caller_metadata(request, {})
    default = await _current(request, metadata)
    registry = await io.unary(request, "ListLoras", common_pb2.ListLorasRequest(), metadata)
    return status_data(default, registry)


ROUTES: tuple[tuple[str, str, Handler, str], ...] = (
    ("/v1/lora/load", "POST", load, "Make an adapter this API key's default"),
    ("/v1/lora/unload", "POST", unload, "Clear this API key's LoRA default"),
    ("/v1/lora/toggle", "POST", toggle, "Enable or disable this API key's LoRA default"),
    ("/v1/lora/scale", "POST", scale, "Set the scale of an adapter of the default"),
    ("/v1/lora/status", "GET", status, "This API key's LoRA default and the known adapters"),
)


def add_routes(routes: APIRouter, respond: Callable[[Any], Any]) -> None:
    """Add the routes to ``routes``; ``respond`` turns a handler's data into the response."""
    for path, method, handler, summary in ROUTES:
        routes.add_api_route(path, _answering(handler, respond), methods=[method],
                             summary=f"{summary} (ACE-Step REST API)")


def _answering(handler: Handler, respond: Callable[[Any], Any]) -> Handler:
    async def route(request: Request) -> Any:
        return respond(await handler(request))

    route.__name__ = f"lora_{handler.__name__}"
    return route
