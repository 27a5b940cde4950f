"""What a song's lyrics say about its length, for ``duration <= 0`` without the LM.

The documents promise that an automatic duration is "chosen from the lyrics' length" (the LM plans
one when it runs; without it the reference picks a random length). The estimate: sung words at
a relaxed 2 words per second, 4 s of music around every section tag (``[Verse]``, ``[Chorus]``,
...), 10 s of intro and outro, rounded to whole seconds and kept within [10, 600] s. No lyrics,
or ``[Instrumental]``, gives the 30 s default.
"""

from __future__ import annotations

import re

from shared.constants import DURATION_MAX_S, DURATION_MIN_S

DEFAULT_DURATION_S = 30.0
WORDS_PER_SECOND = 2.0
SECONDS_PER_SECTION = 4.0
INTRO_OUTRO_S = 10.0
_SECTION_TAG = re.compile(r"^\s*\[[^\]]*\]\s*$")


def duration_from_lyrics(lyrics: str) -> float:
    """Seconds of music the lyrics ask for (see the module docstring)."""
    lines = [line for line in (lyrics or "").splitlines() if line.strip()]
    sections = sum(1 for line in lines if _SECTION_TAG.match(line))
    words = sum(len(line.split()) for line in lines if not _SECTION_TAG.match(line))
    if words == 0:
        return DEFAULT_DURATION_S
    seconds = words / WORDS_PER_SECOND + SECONDS_PER_SECTION * sections + INTRO_OUTRO_S
    return float(min(max(round(seconds), DURATION_MIN_S), DURATION_MAX_S))
