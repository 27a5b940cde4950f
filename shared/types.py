"""The public ACE-Step data types (field names, types and defaults of the seed API, v1.5.2 set).

Pure data: scalars, strings, lists and bytes, so they cross process boundaries. ``src_audio`` and
``reference_audio`` hold either a client-side file path (the SDK reads it and uploads the bytes)
or the file's bytes; services only ever see bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from shared.constants import DEFAULT_DIT_INSTRUCTION, NO_USER_INPUT

AudioSource = Union[str, bytes]


@dataclass
class GenerationParams:
    """What to generate. Metadata left empty/None is planned by the LM when ``thinking`` is on."""

    task_type: str = "text2music"
    instruction: str = DEFAULT_DIT_INSTRUCTION
    reference_audio: Optional[AudioSource] = None
    src_audio: Optional[AudioSource] = None
    audio_codes: str = ""
    caption: str = ""
    lyrics: str = ""
    instrumental: bool = False
    vocal_language: str = "unknown"
    bpm: Optional[int] = None
    keyscale: str = ""
    timesignature: str = ""
    duration: float = -1.0
    inference_steps: int = 8
    seed: int = -1
    guidance_scale: float = 7.0
    use_adg: bool = False
    cfg_interval_start: float = 0.0
    cfg_interval_end: float = 1.0
    shift: float = 1.0
    infer_method: str = "ode"
    timesteps: Optional[list[float]] = None
    repainting_start: float = 0.0
    repainting_end: float = -1
    audio_cover_strength: float = 1.0
    thinking: bool = True
    lm_temperature: float = 0.85
    lm_cfg_scale: float = 2.0
    lm_top_k: int = 0
    lm_top_p: float = 0.9
    lm_negative_prompt: str = NO_USER_INPUT
    use_cot_metas: bool = True
    use_cot_caption: bool = True
    use_cot_lyrics: bool = False
    use_cot_language: bool = True
    use_constrained_decoding: bool = True
    cot_bpm: Optional[int] = None
    cot_keyscale: str = ""
    cot_timesignature: str = ""
    cot_duration: Optional[float] = None
    cot_vocal_language: str = "unknown"
    cot_caption: str = ""
    cot_lyrics: str = ""
    lora_id: Optional[str] = None  # None: no adapter (the protobuf spells it "")
    lora_scale: float = 1.0
    track_name: str = ""
    track_classes: list[str] = field(default_factory=list)
    # LoRA blend: (lora_id, scale) pairs applied together with lora_id/lora_scale (which come first).
    loras: list[tuple[str, float]] = field(default_factory=list)
    # Studio operations (task_type "retake", "extend", "edit"; docs/studio.md). The source is a
    # finished item of the caller's (source_request_id, source_item_index) or, for extend and
    # edit, the src_audio upload.
    source_request_id: str = ""
    source_item_index: int = 0
    retake_seeds: list[int] = field(default_factory=list)  # one item per seed; -1: random
    retake_variance: float = 0.5
    extend_left_seconds: float = 0.0
    extend_right_seconds: float = 0.0
    edit_mode: str = "only_lyrics"  # or "remix"
    edit_target_caption: str = ""
    edit_target_lyrics: str = ""
    edit_n_min: float = 0.0
    edit_n_max: float = 1.0
    cfg_type: str = "apg"  # base models' guidance rule: apg, cfg or cfg_star (use_adg picks ADG)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationConfig:
    """How many outputs and in which format."""

    batch_size: int = 2
    allow_lm_batch: bool = False
    use_random_seed: bool = True
    seeds: Optional[Union[list[int], int]] = None
    lm_batch_chunk_size: int = 8
    constrained_decoding_debug: bool = False
    audio_format: str = "flac"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AudioOutput:
    """One generated item. Readable as attributes or, like the seed's dicts, as ``audio["path"]``."""

    path: str = ""
    tensor: Any = None               # torch.Tensor [channels, samples] float32, or None
    key: str = ""
    sample_rate: int = 48_000
    params: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def keys(self) -> list[str]:
        return ["path", "tensor", "key", "sample_rate", "params"]


@dataclass
class GenerationResult:
    """Result of generate_music. Failures come back as ``success=False`` with ``error`` set."""

    audios: list[AudioOutput] = field(default_factory=list)
    status_message: str = ""
    extra_outputs: dict[str, Any] = field(default_factory=dict)
    success: bool = True
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UnderstandResult:
    caption: str = ""
    lyrics: str = ""
    bpm: Optional[int] = None
    duration: Optional[float] = None
    keyscale: str = ""
    language: str = ""
    timesignature: str = ""
    status_message: str = ""
    success: bool = True
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CreateSampleResult:
    caption: str = ""
    lyrics: str = ""
    bpm: Optional[int] = None
    duration: Optional[float] = None
    keyscale: str = ""
    language: str = ""
    timesignature: str = ""
    instrumental: bool = False
    status_message: str = ""
    success: bool = True
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FormatSampleResult:
    caption: str = ""
    lyrics: str = ""
    bpm: Optional[int] = None
    duration: Optional[float] = None
    keyscale: str = ""
    language: str = ""
    timesignature: str = ""
    status_message: str = ""
    success: bool = True
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MusicMetadata:
    """Song-level metadata as planned by the LM (or given by the user)."""

    bpm: Optional[int] = None
    keyscale: str = ""
    timesignature: str = ""
    duration: Optional[float] = None
    language: str = ""
    caption: str = ""
    lyrics: str = ""
    genres: list[str] = field(default_factory=list)


@dataclass
class UnderstandParams:
    audio_codes: str = ""
    temperature: float = 0.85
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    use_constrained_decoding: bool = True
    constrained_decoding_debug: bool = False


@dataclass
class CreateSampleParams:
    query: str = ""
    instrumental: bool = False
    vocal_language: str = "unknown"
    temperature: float = 0.85
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    use_constrained_decoding: bool = True
    constrained_decoding_debug: bool = False


@dataclass
class FormatSampleParams:
    caption: str = ""
    lyrics: str = ""
    user_metadata: MusicMetadata = field(default_factory=MusicMetadata)
    temperature: float = 0.85
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    use_constrained_decoding: bool = True
    constrained_decoding_debug: bool = False
