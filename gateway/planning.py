"""Pure decisions of the generate flow, as the seed API's generate_music makes them.

When the LM runs, which seeds each item gets, how LM metadata fills the request, and the stable
per-item key. No I/O here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Optional

from shared.audio_codes import format_codes
from shared.constants import CAPTION_MAX_CHARS
from shared.types import GenerationConfig, GenerationParams, MusicMetadata
from shared.lyrics import duration_from_lyrics
from shared.validation import STUDIO_TASK_TYPES, clip_text

INSTRUMENTAL_LYRICS = "[Instrumental]"

SOURCE_AUDIO_TASKS = ("cover", "repaint", "lego", "extract", "complete")
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class LmDecision:
    """Whether the LM runs for a request and what it produces."""

    use_lm: bool
    need_codes: bool
    reason: str


def decide_lm(params: GenerationParams, lm_available: bool) -> LmDecision:
    """Whether the LM runs, as ``generate_music`` decides (reference ``inference.generate_music``):
    when thinking or any ``use_cot_*`` flag is on; audio codes only for text2music with thinking
    on and no user codes. Repaint never uses the LM (its structure is the source's). Cover, lego,
    extract and complete plan metadata only: the seed document's "Style Cover with LM Reasoning"
    expects ``lm_metadata`` for a cover (the reference skips the LM there), and the DiT takes the
    structure of these tasks from the source audio, so LM codes would go unused."""
    if params.task_type == "repaint":
        return LmDecision(False, False, "task_type repaint takes its structure from src_audio")
    if params.task_type in STUDIO_TASK_TYPES:
        return LmDecision(False, False, f"task_type {params.task_type} reuses its source item or audio")
    wants_lm = params.thinking or params.use_cot_metas or params.use_cot_caption or params.use_cot_language
    if not wants_lm:
        return LmDecision(False, False, "thinking and every use_cot_* flag are off")
    if not lm_available:
        return LmDecision(False, False, "no LM service configured")
    if params.task_type in SOURCE_AUDIO_TASKS:
        return LmDecision(True, False, f"metadata only: task_type {params.task_type} takes its structure "
                                       "from src_audio")
    has_codes = bool(params.audio_codes.strip())
    need_codes = params.thinking and not has_codes
    return LmDecision(True, need_codes, "codes given by the user" if has_codes else "planned by the LM")


def resolve_seeds(params: GenerationParams, config: GenerationConfig, rng: Optional[random.Random] = None) -> list[int]:
    """One seed per item: given seeds first (-1 → random), padded with random seeds.
    Without given seeds and with use_random_seed off, a non-negative params.seed seeds item 0."""
    rng = rng or random.SystemRandom()
    given = [config.seeds] if isinstance(config.seeds, int) else list(config.seeds or [])
    if not given and not config.use_random_seed and params.seed >= 0:
        given = [params.seed]
    seeds = [s if s >= 0 else rng.randint(0, MAX_SEED) for s in given[: config.batch_size]]
    while len(seeds) < config.batch_size:
        seeds.append(rng.randint(0, MAX_SEED))
    return seeds


def user_metadata(params: GenerationParams) -> MusicMetadata:
    """What the user fixed (the LM forces these values and plans the rest)."""
    return MusicMetadata(
        bpm=params.bpm,
        keyscale=params.keyscale.strip(),
        timesignature=params.timesignature.strip(),
        duration=params.duration if params.duration > 0 else None,
        language=params.vocal_language if params.vocal_language not in ("", "unknown") else "",
    )


def merge_lm_metadata(params: GenerationParams, lm: MusicMetadata) -> GenerationParams:
    """LM values fill only what the user left open; the caption becomes the LM's when
    use_cot_caption is on. The detected language is used when the user left it unknown."""
    merged = dataclasses.replace(
        params,
        cot_bpm=lm.bpm,
        cot_keyscale=lm.keyscale,
        cot_timesignature=lm.timesignature,
        cot_duration=lm.duration,
        cot_vocal_language=lm.language or "unknown",
        cot_caption=lm.caption,
        cot_lyrics=lm.lyrics,
    )
    if merged.bpm is None and lm.bpm is not None:
        merged.bpm = lm.bpm
    merged.keyscale = merged.keyscale or lm.keyscale
    merged.timesignature = merged.timesignature or lm.timesignature
    if merged.duration <= 0 and lm.duration:
        merged.duration = float(lm.duration)
    if params.use_cot_caption and lm.caption:
        merged.caption = clip_text(lm.caption, CAPTION_MAX_CHARS)
    if params.use_cot_language and merged.vocal_language in ("", "unknown") and lm.language:
        merged.vocal_language = lm.language
    return merged


def fill_duration(params: GenerationParams) -> GenerationParams:
    """An automatic text2music duration that the LM did not plan is chosen from the lyrics' length
    (``shared.lyrics``); given audio codes fix the length themselves, source tasks take the source's."""
    if params.task_type != "text2music" or params.duration > 0 or params.audio_codes.strip():
        return params
    return dataclasses.replace(params, duration=duration_from_lyrics(INSTRUMENTAL_LYRICS if params.instrumental
                                                                     else params.lyrics))


def item_params(params: GenerationParams, seed: int, codes: Optional[list[int]]) -> GenerationParams:
    """The parameters that produced one item (its seed and its codes)."""
    audio_codes = format_codes(codes) if codes else params.audio_codes
    return dataclasses.replace(params, seed=seed, audio_codes=audio_codes)


def item_key(params: GenerationParams) -> str:
    """A stable key for an item: the same parameters (seed and codes included) give the same key."""
    fields = {}
    for name, value in dataclasses.asdict(params).items():
        if isinstance(value, (bytes, bytearray)):
            value = "sha256:" + hashlib.sha256(value).hexdigest()
        fields[name] = value
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
