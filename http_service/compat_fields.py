"""The request fields of ACE-Step 1.5's REST server (``POST /release_task``) and what each becomes here.

:data:`FIELDS` is the one table: every upstream field with its spellings, its documented default
and its fate — mapped onto :class:`GenerationParams` / :class:`GenerationConfig`, handled by the
compatibility flow (sample / format / uploads / auth), accepted and ignored, or refused when set
— with the reason. ``docs/http-compat.md`` embeds :func:`markdown_table` (a unit test keeps the
two equal; ``python -m http_service.compat_fields`` prints it).

Values are read like upstream reads them: the top-level body first, then the ``param_obj`` object,
then a nested metadata object (``metas``, ``meta``, ``metadata``, ``user_metadata``,
``userMetadata``); ``null``, ``""`` and ``"N/A"`` count as absent. Form fields arrive as strings,
so numbers and booleans are accepted as strings too. Unlike upstream, a value that does not parse
is refused with a 400 naming the field (upstream silently used the default), and an unknown
top-level field is refused (nested metadata objects may carry other keys: results echo them).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from shared.constants import DEFAULT_DIT_INSTRUCTION, NO_USER_INPUT
from shared.types import GenerationConfig, GenerationParams

MAPPED, FLOW, IGNORED, REFUSED = "mapped", "flow", "ignored", "refused when true"
ABSENT_MARKERS = ("", "N/A")
INT32_MAX = 2**31 - 1
MAX_SEED_ITEMS = 8


class FieldError(ValueError):
    """A request value that cannot be used: ``field`` is the upstream name the client sent."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = f"{field_name}: {message}"


@dataclass(frozen=True)
class CompatField:
    """One upstream request field. ``target`` names the GenerationParams/GenerationConfig field it
    fills (``params.x`` / ``config.x``) or is empty; ``fate`` says what happens to it here."""

    name: str
    kind: str                          # str | int | float | bool | timesteps | seed | file | path | any
    default: Any                       # upstream's default (None: absent)
    target: str = ""
    fate: str = MAPPED
    aliases: tuple[str, ...] = ()      # upstream's other spellings; camelCase forms are added
    note: str = ""
    spellings: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        names = (self.name, *self.aliases)
        camel = tuple(_camel(n) for n in names if "_" in n)
        object.__setattr__(self, "spellings", tuple(dict.fromkeys(names + camel)))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _f(name, kind, default, target="", fate=MAPPED, aliases=(), note=""):
    return CompatField(name, kind, default, target, fate, tuple(aliases), note)


FIELDS: tuple[CompatField, ...] = (
    _f("prompt", "str", "", "params.caption", aliases=("caption",)),
    _f("lyrics", "str", "", "params.lyrics",
       note="also sets `instrumental` as upstream does: empty, `[inst]` or `[instrumental]` lyrics"),
    _f("thinking", "bool", False, "params.thinking", note="upstream's default `false` applies (ours is true)"),
    _f("vocal_language", "str", "en", "params.vocal_language", aliases=("vocalLanguage", "language"),
       note="upstream's default `en` applies (ours is `unknown`)"),
    _f("audio_format", "str", "mp3", "config.audio_format", note="mp3, wav, flac or ogg; upstream's default `mp3`"),
    _f("sample_mode", "bool", False, fate=FLOW, aliases=("sampleMode",),
       note="the LM writes caption, lyrics and metadata (CreateSample) before the task is queued"),
    _f("sample_query", "str", "", fate=FLOW, aliases=("sampleQuery", "description", "desc"),
       note="CreateSample with this query before the task is queued"),
    _f("use_format", "bool", False, fate=FLOW, aliases=("useFormat", "format"),
       note="FormatSample of caption and lyrics before the task is queued"),
    _f("model", "str", None, fate=IGNORED, aliases=("model_name", "modelName", "dit_model", "ditModel"),
       note="a deployment serves one DiT model (see `/v1/models`); upstream also falls back to its "
            "default model for names it does not serve"),
    _f("bpm", "int", None, "params.bpm"),
    _f("key_scale", "str", "", "params.keyscale", aliases=("keyscale", "keyScale", "key")),
    _f("time_signature", "str", "", "params.timesignature", aliases=("timesignature", "timeSignature")),
    _f("audio_duration", "float", None, "params.duration",
       aliases=("duration", "audioDuration", "target_duration", "targetDuration"),
       note="absent or 0: automatic (-1)"),
    _f("audio_code_string", "any", "", fate=IGNORED, aliases=("audioCodeString",),
       note="the document says `thinking=false` ignores it and `thinking=true` has the LM write the codes"),
    _f("inference_steps", "int", 8, "params.inference_steps", aliases=("inferenceSteps",)),
    _f("guidance_scale", "float", 7.0, "params.guidance_scale", aliases=("guidanceScale",)),
    _f("use_random_seed", "bool", True, "config.use_random_seed", aliases=("useRandomSeed",)),
    _f("seed", "seed", -1, "params.seed",
       note="used when `use_random_seed` is false; a comma-separated list (as in `seed_value`) seeds "
            "the items in order"),
    _f("batch_size", "int", 2, "config.batch_size"),
    _f("shift", "float", 3.0, "params.shift", note="upstream's default 3.0 applies (ours is 1.0)"),
    _f("infer_method", "str", "ode", "params.infer_method", aliases=("inferMethod",)),
    _f("timesteps", "timesteps", None, "params.timesteps",
       note="comma-separated (or a JSON list), descending, in [0, 1]"),
    _f("use_adg", "bool", False, "params.use_adg"),
    _f("cfg_interval_start", "float", 0.0, "params.cfg_interval_start"),
    _f("cfg_interval_end", "float", 1.0, "params.cfg_interval_end"),
    _f("lm_model_path", "str", None, fate=IGNORED, note="the LM is chosen when the stack is deployed"),
    _f("lm_backend", "str", "vllm", fate=IGNORED, note="`vllm`, `pt` or `mlx` accepted; the LM service runs vLLM"),
    _f("lm_temperature", "float", 0.85, "params.lm_temperature"),
    _f("lm_cfg_scale", "float", 2.5, "params.lm_cfg_scale", note="upstream's default 2.5 applies (ours is 2.0)"),
    _f("lm_negative_prompt", "str", NO_USER_INPUT, "params.lm_negative_prompt"),
    _f("lm_top_k", "int", None, "params.lm_top_k", note="absent or 0: disabled"),
    _f("lm_top_p", "float", 0.9, "params.lm_top_p", note=">= 1 is treated as disabled (1.0)"),
    _f("lm_repetition_penalty", "float", 1.0, fate=IGNORED,
       note="upstream's generation does not use it either; the planning LM samples without one"),
    _f("use_cot_caption", "bool", True, "params.use_cot_caption", aliases=("cot_caption", "cot-caption")),
    _f("use_cot_language", "bool", True, "params.use_cot_language", aliases=("cot_language", "cot-language")),
    _f("constrained_decoding", "bool", True, "params.use_constrained_decoding",
       aliases=("constrainedDecoding", "constrained")),
    _f("constrained_decoding_debug", "bool", False, "config.constrained_decoding_debug",
       aliases=("constrainedDecodingDebug",)),
    _f("allow_lm_batch", "bool", True, "config.allow_lm_batch", aliases=("allowLmBatch", "parallel_thinking"),
       note="upstream's default `true` applies (ours is false)"),
    _f("reference_audio_path", "path", None, "params.reference_audio", fate=FLOW,
       aliases=("ref_audio_path", "referenceAudioPath", "refAudioPath"),
       note="only a `/v1/audio?path=...` URL (or its `path` value) issued by this server; a server-side "
            "path is never opened (400): upload the file instead"),
    _f("src_audio_path", "path", None, "params.src_audio", fate=FLOW,
       aliases=("ctx_audio_path", "sourceAudioPath", "srcAudioPath", "ctxAudioPath"),
       note="as `reference_audio_path`"),
    _f("reference_audio", "file", None, "params.reference_audio", fate=FLOW, aliases=("ref_audio",),
       note="multipart file upload"),
    _f("src_audio", "file", None, "params.src_audio", fate=FLOW, aliases=("ctx_audio",), note="multipart file upload"),
    _f("task_type", "str", "text2music", "params.task_type", aliases=("taskType",)),
    _f("instruction", "str", DEFAULT_DIT_INSTRUCTION, "params.instruction",
       note="the default instruction is replaced by the task's own, as upstream does"),
    _f("repainting_start", "float", 0.0, "params.repainting_start"),
    _f("repainting_end", "float", None, "params.repainting_end", note="absent or 0: end of the source (-1)"),
    _f("audio_cover_strength", "float", 1.0, "params.audio_cover_strength", aliases=("audioCoverStrength",)),
    _f("use_tiled_decode", "bool", True, fate=IGNORED, aliases=("useTiledDecode",),
       note="the VAE decode is always tiled here"),
    _f("is_format_caption", "bool", False, fate=IGNORED, aliases=("isFormatCaption",),
       note="read but unused by upstream too"),
    _f("analysis_only", "bool", False, fate=REFUSED, aliases=("analysisOnly",),
       note="LM-only analysis through a task is not offered; `POST /v1/understand` (native API) understands audio"),
    _f("full_analysis_only", "bool", False, fate=REFUSED, aliases=("fullAnalysisOnly",),
       note="as `analysis_only`"),
    _f("ai_token", "str", None, fate=FLOW, note="the API key (also `Authorization: Bearer`)"),
    _f("param_obj", "any", None, fate=FLOW, note="a JSON object (or its text) searched after the body"),
    _f("metas", "any", None, fate=FLOW, aliases=("meta", "metadata", "user_metadata", "userMetadata"),
       note="a JSON object (or its text) searched after `param_obj`"),
)
BY_NAME = {f.name: f for f in FIELDS}
BY_SPELLING = {spelling: f for f in FIELDS for spelling in f.spellings}
# our field name (as the gateway reports it) -> the upstream name a client sends
UPSTREAM_NAME = {f.target.split(".", 1)[1]: f.name for f in FIELDS if f.target and f.fate == MAPPED}


def unknown_fields(raw: dict[str, Any]) -> list[str]:
    return [key for key in raw if key not in BY_SPELLING]


def api_token(raw: dict[str, Any]) -> str:
    """The ``ai_token`` of a body (any spelling), or ``""``."""
    for spelling in BY_NAME["ai_token"].spellings:
        value = raw.get(spelling)
        if value not in (None, ""):
            return as_str(spelling, value)
    return ""


# ---- value parsing ---------------------------------------------------------------------------------

_TRUE, _FALSE = {"1", "true", "yes", "y", "on"}, {"0", "false", "no", "n", "off"}


def show(value: Any, limit: int = 60) -> str:
    """A client value quoted safely for an error message (ASCII, bounded)."""
    text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


def as_str(name: str, value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
        raise FieldError(name, f"expected text, got {show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(name, f"expected text, got {show(value)}")
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FieldError(name, f"expected valid Unicode text, got {show(value)}") from None
    return text


def as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FieldError(name, f"expected a number, got {show(value)}")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (ValueError, OverflowError):
        raise FieldError(name, f"expected a number, got {show(value)}") from None
    if not math.isfinite(number):
        raise FieldError(name, f"expected a finite number, got {show(value)}")
    return number


def as_int(name: str, value: Any, limit: int = INT32_MAX) -> int:
    number = as_float(name, value) if not isinstance(value, int) or isinstance(value, bool) else value
    if isinstance(number, float) and not number.is_integer():
        raise FieldError(name, f"expected an integer, got {show(value)}")
    number = int(number)
    if abs(number) > limit:
        raise FieldError(name, f"must be at most {limit} in magnitude, got {show(value)}")
    return number


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise FieldError(name, f"expected true or false, got {show(value)}")


def as_timesteps(name: str, value: Any) -> list[float]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 64:
        raise FieldError(name, f"expected comma-separated numbers (at most 64), got {show(value)}")
    return [as_float(name, item) for item in items if not (isinstance(item, str) and not item.strip())]


def as_seeds(name: str, value: Any) -> list[int]:
    """One seed, or a comma-separated list of seeds (upstream's ``seed_value`` format)."""
    items = value.split(",") if isinstance(value, str) else [value]
    if len(items) > MAX_SEED_ITEMS:
        raise FieldError(name, f"at most {MAX_SEED_ITEMS} seeds, got {len(items)}")
    return [as_int(name, item, limit=2**63 - 1) for item in items]


def as_object(name: str, value: Any) -> dict[str, Any]:
    """A nested JSON object given as an object or as its JSON text."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            parsed = json.loads(value, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise FieldError(name, f"expected a JSON object, got {show(value)}") from None
        if isinstance(parsed, dict):
            return parsed
    raise FieldError(name, f"expected a JSON object, got {show(value)}")


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a number")


_PARSERS = {"str": as_str, "int": as_int, "float": as_float, "bool": as_bool, "timesteps": as_timesteps,
            "seed": as_seeds}


# ---- reading a request ------------------------------------------------------------------------------


class Values:
    """Upstream's lookup: body, then ``param_obj``, then the nested metadata object."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.param_obj, self.metas = self._container(raw, "param_obj"), self._container(raw, "metas")

    @staticmethod
    def _container(raw: dict[str, Any], name: str) -> dict[str, Any]:
        for spelling in BY_NAME[name].spellings:
            if raw.get(spelling) not in (None, ""):
                return as_object(spelling, raw[spelling])
        return {}

    def find(self, name: str) -> tuple[str, Any]:
        """``(spelling used, value)``; ``("", None)`` when absent everywhere."""
        spec = BY_NAME[name]
        for source in (self.raw, self.param_obj, self.metas):
            for spelling in spec.spellings:
                value = source.get(spelling)
                if value is not None and not (isinstance(value, str) and value.strip() in ABSENT_MARKERS):
                    return spelling, value
        return "", None

    def get(self, name: str) -> Any:
        """The parsed value, or upstream's default when absent."""
        spec = BY_NAME[name]
        spelling, value = self.find(name)
        if value is None:
            return spec.default
        parser = _PARSERS.get(spec.kind)
        return parser(spelling, value) if parser else value


@dataclass
class ReleaseRequest:
    """A ``/release_task`` request read into our types, plus what the compatibility flow does first."""

    params: GenerationParams
    config: GenerationConfig
    sample_mode: bool = False
    sample_query: str = ""
    use_format: bool = False
    audio_refs: dict[str, str] = field(default_factory=dict)  # params field -> /v1/audio URL or id


def is_instrumental(lyrics: str) -> bool:
    """Upstream's rule: no lyrics, or just an instrumental tag."""
    return lyrics.strip().lower() in ("", "[inst]", "[instrumental]")


def read_release_task(raw: dict[str, Any]) -> ReleaseRequest:
    """Every upstream field read with its default; raises :class:`FieldError`."""
    unknown = unknown_fields(raw)
    if unknown:
        raise FieldError(show(unknown[0]), "unknown field (not part of the ACE-Step REST API; see docs/http-compat.md)")
    for spec in (BY_NAME["src_audio"], BY_NAME["reference_audio"]):
        for spelling in spec.spellings:
            if spelling in raw:
                raise FieldError(spelling, "must be a file upload (multipart/form-data)")
    values = Values(raw)
    for spec in FIELDS:
        if spec.fate == REFUSED and as_bool(*_found_or_default(values, spec)):
            raise FieldError(spec.name, f"is not supported by this server ({spec.note})")
    lm_backend = values.get("lm_backend")
    if as_str("lm_backend", lm_backend) not in ("vllm", "pt", "mlx"):
        raise FieldError("lm_backend", f"must be vllm, pt or mlx, got {show(lm_backend)}")
    for name in ("model", "lm_model_path", "lm_repetition_penalty", "use_tiled_decode", "is_format_caption"):
        values.get(name)  # ignored, but still type-checked
    params, config = GenerationParams(), GenerationConfig()
    for spec in FIELDS:
        if spec.fate == MAPPED and spec.kind not in ("seed",):
            owner = params if spec.target.startswith("params.") else config
            setattr(owner, spec.target.split(".", 1)[1], values.get(spec.name))
    _fix_upstream_conventions(params, config, values)
    request = ReleaseRequest(params, config, sample_mode=values.get("sample_mode"),
                             sample_query=values.get("sample_query").strip(), use_format=values.get("use_format"))
    for name in ("src_audio_path", "reference_audio_path"):
        spelling, value = values.find(name)
        if value is not None:
            request.audio_refs[BY_NAME[name].target.split(".", 1)[1]] = as_str(spelling, value).strip()
    return request


def _found_or_default(values: Values, spec: CompatField) -> tuple[str, Any]:
    spelling, value = values.find(spec.name)
    return (spelling, value) if value is not None else (spec.name, spec.default)


def _fix_upstream_conventions(params: GenerationParams, config: GenerationConfig, values: Values) -> None:
    """Upstream's readings of absent or special values (see the table's notes)."""
    params.duration = params.duration if params.duration else -1.0
    params.repainting_end = params.repainting_end if params.repainting_end else -1.0
    params.lm_top_k = params.lm_top_k or 0
    params.lm_top_p = min(params.lm_top_p, 1.0)
    params.instrumental = is_instrumental(params.lyrics)
    params.use_cot_metas = True
    seeds = values.get("seed")
    seeds = seeds if isinstance(seeds, list) else [seeds]
    params.seed = seeds[0]
    if not config.use_random_seed and len(seeds) > 1:
        config.seeds = seeds


def markdown_table() -> str:
    """The field table of ``docs/http-compat.md``."""
    rows = ["| Upstream field | Other spellings | Default | Here |", "| :--- | :--- | :--- | :--- |"]
    for spec in FIELDS:
        others = ", ".join(f"`{s}`" for s in spec.spellings[1:]) or "-"
        default = "-" if spec.default is None else f"`{json.dumps(spec.default)}`"
        where = f"`{spec.target}`" if spec.fate == MAPPED else spec.fate
        note = f"{where}; {spec.note}" if spec.note else where
        rows.append(f"| `{spec.name}` | {others} | {default} | {note} |")
    return "\n".join(rows) + "\n"


_SAFE_REF = re.compile(r"[\x20-\x7e]{1,2048}")


def check_audio_ref(name: str, value: str) -> str:
    """A ``*_audio_path`` value of printable ASCII (resolved, or refused, by the router)."""
    if not _SAFE_REF.fullmatch(value):
        raise FieldError(name, f"expected a /v1/audio URL issued by this server, got {show(value)}")
    return value


if __name__ == "__main__":
    print(markdown_table(), end="")
