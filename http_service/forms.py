"""Request bodies of the native HTTP API: pydantic models built from the public dataclasses
(``shared.types``), strict JSON reading, multipart uploads, and the gRPC requests they become.

The models have exactly the dataclasses' field names, types and defaults (the SDK's names), with
unknown fields refused, no type coercion (``"3"`` is not a number, ``1`` is not a boolean), no
NaN or infinity, and integers bounded by the protobuf field that carries them. Every refusal is a
:class:`FormError` naming the field (``params.duration``) and what was wrong.

Reusable by any route that reads a generation request: :func:`generation_from_json` turns JSON
bytes into ``(GenerationParams, GenerationConfig)``, :func:`read_generation` reads a whole HTTP
request (JSON, or multipart with a ``request`` JSON part and file parts), :func:`generate_request`
builds the gateway's ``GenerateRequest``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Annotated, Optional, Union

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.datastructures import UploadFile

from shared import convert
from shared.errors import InvalidArgument
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.types import (
    CreateSampleParams,
    FormatSampleParams,
    GenerationConfig,
    GenerationParams,
    MusicMetadata,
    UnderstandParams,
)

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UPLOAD_FIELDS = ("src_audio", "reference_audio")
MAX_REQUEST_PART_BYTES = 4 * 1024 * 1024   # the JSON part of a multipart request
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_PROTO_INT32 = 5  # FieldDescriptor.TYPE_INT32


class FormError(Exception):
    """A request the edge refuses before calling the gateway: HTTP ``status``, offending ``field``."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


def show(value: Any, limit: int = 60) -> str:
    """A short, printable rendering of a client's value for error messages."""
    text = repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- models from dataclasses ------------------------------------------------------------------------


def _int_bounds(message_cls: Any) -> dict[str, tuple[int, int]]:
    if message_cls is None:
        return {}
    return {f.name: INT32 if f.type == _PROTO_INT32 else INT64 for f in message_cls.DESCRIPTOR.fields}


def _bounded(annotation: Any, bounds: tuple[int, int]) -> Any:
    """``annotation`` with every ``int`` inside it limited to ``bounds`` (a protobuf integer's range)."""
    if annotation is int:
        return Annotated[int, Field(ge=bounds[0], le=bounds[1])]
    if dataclasses.is_dataclass(annotation):
        return model_of(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is None or not args:
        return annotation
    inner = tuple(_bounded(arg, bounds) for arg in args)
    if origin in (Union, types.UnionType):
        return Union[inner]
    if origin is list:
        return list[inner[0]]
    if origin is tuple:
        return tuple[inner]
    return annotation


_MESSAGES = {GenerationParams: common_pb2.GenerationParams, GenerationConfig: common_pb2.GenerationConfig,
             UnderstandParams: common_pb2.UnderstandParams, CreateSampleParams: common_pb2.CreateSampleParams,
             FormatSampleParams: common_pb2.FormatSampleParams, MusicMetadata: common_pb2.MusicMetadata}
_MODELS: dict[tuple[Any, ...], type[BaseModel]] = {}


def model_of(cls: type, exclude: tuple[str, ...] = (), name: str = "", strict: bool = True) -> type[BaseModel]:
    """A pydantic model with the fields, types and defaults of the dataclass ``cls`` (less
    ``exclude``); strict models refuse unknown fields and coercions."""
    key = (cls, exclude, name, strict)
    if key in _MODELS:
        return _MODELS[key]
    hints = typing.get_type_hints(cls)
    bounds = _int_bounds(_MESSAGES.get(cls))
    definitions: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        annotation = _bounded(hints[field.name], bounds.get(field.name, INT64))
        if field.default is not dataclasses.MISSING:
            definitions[field.name] = (annotation, Field(default=field.default))
        elif dataclasses.is_dataclass(hints[field.name]):
            definitions[field.name] = (annotation, Field(default_factory=annotation))
        else:
            definitions[field.name] = (annotation, Field(default_factory=field.default_factory))
    config = STRICT if strict else ConfigDict(extra="ignore")
    model = create_model(name or cls.__name__, __config__=config, __doc__=cls.__doc__, **definitions)
    _MODELS[key] = model
    return model


ParamsModel = model_of(GenerationParams, exclude=UPLOAD_FIELDS)
ConfigModel = model_of(GenerationConfig)
UnderstandModel = model_of(UnderstandParams)
CreateSampleModel = model_of(CreateSampleParams)
FormatSampleModel = model_of(FormatSampleParams)


class GenerationBody(BaseModel):
    """A generation: ``params`` (GenerationParams fields) and ``config`` (GenerationConfig fields);
    fields left out keep the public API's defaults. Uploads (``src_audio``, ``reference_audio``)
    come as multipart file parts beside this body, never as JSON values or server paths."""

    model_config = STRICT
    params: ParamsModel = Field(default_factory=ParamsModel)  # type: ignore[valid-type]
    config: ConfigModel = Field(default_factory=ConfigModel)  # type: ignore[valid-type]


# ---- reading ----------------------------------------------------------------------------------------


def _error_from(error: ValidationError, what: str) -> FormError:
    first = error.errors(include_url=False)[0]
    location = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" if index else str(part)
                       for index, part in enumerate(first["loc"]))
    location = location.encode("utf-8", "backslashreplace").decode("utf-8")[:200]  # a client's key, bounded
    kind = first["type"]
    if kind == "json_invalid":
        return FormError("body", f"invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    if not first["loc"]:
        return FormError("body", f"the body must be a JSON object ({what}), got {show(first.get('input'))}")
    if kind == "extra_forbidden":
        name = location.rsplit(".", 1)[-1]
        if name in UPLOAD_FIELDS:
            return FormError(location, f"{location}: send the file as the multipart part {name!r} "
                                       "(the server never opens paths)")
        return FormError(location, f"{location}: unknown field (the fields of {what} are listed at /docs)")
    return FormError(location, f"{location}: {first['msg']}, got {show(first.get('input'))}")


def _check_text(value: Any, location: str) -> None:
    """Strings must be encodable (JSON ``\\ud800`` escapes decode to lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FormError(location, f"{location}: not valid Unicode text (a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(item, f"{location}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_text(item, f"{location}[{index}]")


def validate_json(model: type[BaseModel], raw: bytes, what: str) -> dict[str, Any]:
    """The fields a client set, checked against ``model`` (``FormError`` on any problem)."""
    try:
        values = model.model_validate_json(raw or b"{}").model_dump(exclude_unset=True)
    except ValidationError as error:
        raise _error_from(error, what) from None
    _check_text(values, "body")
    return values


def generation_from_json(raw: bytes, uploads: Optional[dict[str, bytes]] = None
                         ) -> tuple[GenerationParams, GenerationConfig]:
    """JSON ``{"params": {...}, "config": {...}}`` (and upload bytes by field) → the dataclasses."""
    values = validate_json(GenerationBody, raw, "GenerationParams / GenerationConfig")
    params = GenerationParams(**values.get("params", {}), **(uploads or {}))
    config = GenerationConfig(**values.get("config", {}))
    return params, config


def generate_request(params: GenerationParams, config: GenerationConfig) -> gw.GenerateRequest:
    try:
        return gw.GenerateRequest(params=convert.params_to_pb(params), config=convert.config_to_pb(config))
    except InvalidArgument as error:
        prefix = "config" if error.field in {f.name for f in dataclasses.fields(GenerationConfig)} else "params"
        raise FormError(f"{prefix}.{error.field}" if error.field else prefix, error.message) from None


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_multipart(request: Request) -> bool:
    return _content_type(request) == "multipart/form-data"


def _require_json(request: Request) -> None:
    kind = _content_type(request)
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise FormError("content-type", f"unsupported Content-Type {show(kind)}: send application/json, or "
                                        "multipart/form-data with a 'request' JSON part", status=415)


async def read_multipart(request: Request, file_fields: tuple[str, ...]) -> tuple[bytes, dict[str, bytes]]:
    """A multipart body: its ``request`` part (JSON text, as a field or a file part) and the bytes
    of each part named in ``file_fields``; any other or repeated part is refused."""
    form = await request.form(max_files=len(file_fields) + 1, max_fields=1, max_part_size=MAX_REQUEST_PART_BYTES)
    try:
        raw, files, seen = b"{}", {}, set()
        for key, value in form.multi_items():
            if key in seen:
                raise FormError(key, f"{show(key)}: the part is repeated")
            seen.add(key)
            if key == "request":
                raw = (await value.read(MAX_REQUEST_PART_BYTES + 1) if isinstance(value, UploadFile)
                       else value.encode("utf-8", "surrogatepass"))
                if len(raw) > MAX_REQUEST_PART_BYTES:
                    raise FormError("request", f"request: the JSON part is larger than {MAX_REQUEST_PART_BYTES} bytes")
            elif key in file_fields and isinstance(value, UploadFile):
                files[key] = await value.read()
            else:
                expected = ", ".join(("request (JSON)", *(f"{name} (file)" for name in file_fields)))
                raise FormError(key, f"{show(key)}: unexpected multipart part; expected {expected}")
        return raw, files
    finally:
        await form.close()


async def read_generation(request: Request) -> tuple[GenerationParams, GenerationConfig]:
    """A generation request: a JSON :class:`GenerationBody`, or multipart/form-data with that JSON
    as the ``request`` part and ``src_audio`` / ``reference_audio`` file parts."""
    if is_multipart(request):
        raw, files = await read_multipart(request, UPLOAD_FIELDS)
        return generation_from_json(raw, files)
    _require_json(request)
    return generation_from_json(await request.body())


async def read_json(request: Request, model: type[BaseModel], what: str) -> dict[str, Any]:
    _require_json(request)
    return validate_json(model, await request.body(), what)


async def read_understand(request: Request) -> tuple[UnderstandParams, Optional[bytes]]:
    """UnderstandParams as JSON, or multipart with a ``request`` JSON part and an ``audio`` file
    (encoded to codes by the DiT first)."""
    audio = None
    if is_multipart(request):
        raw, files = await read_multipart(request, ("audio",))
        audio = files.get("audio")
        values = validate_json(UnderstandModel, raw, "UnderstandParams")
    else:
        values = await read_json(request, UnderstandModel, "UnderstandParams")
    return UnderstandParams(**values), audio


def format_sample_params(values: dict[str, Any]) -> FormatSampleParams:
    meta = MusicMetadata(**values.pop("user_metadata", {}))
    return FormatSampleParams(**values, user_metadata=meta)


def items_expected(params: GenerationParams, config: GenerationConfig) -> int:
    """How many items a request makes: one per retake seed for a retake, else ``batch_size``."""
    if params.task_type == "retake":
        return max(len(params.retake_seeds), 1)
    return config.batch_size
