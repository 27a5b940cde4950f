"""Value sets and limits of ACE-Step 1.5 (reference constants, plus our service limits)."""

from __future__ import annotations

SAMPLE_RATE_HZ = 48_000
NUM_CHANNELS = 2
VAE_HOP_SAMPLES = 1920                 # 48 kHz / 1920 = 25 latent frames per second
LATENT_FRAMES_PER_SECOND = 25
CODES_PER_SECOND = 5                   # one audio code per 5 latent frames
NUM_AUDIO_CODES = 64_000               # FSQ levels [8, 8, 8, 5, 5, 5]
MAX_AUDIO_CODE = NUM_AUDIO_CODES - 1

BPM_MIN, BPM_MAX = 30, 300
DURATION_MIN_S, DURATION_MAX_S = 10.0, 600.0
VALID_TIME_SIGNATURES = ("2", "3", "4", "6")  # 2/4, 3/4, 4/4, 6/8
CAPTION_MAX_CHARS = 512
LYRICS_MAX_CHARS = 4096
BATCH_SIZE_MIN, BATCH_SIZE_MAX = 1, 8
TURBO_MAX_STEPS = 20
BASE_MAX_STEPS = 200
GUIDANCE_MIN, GUIDANCE_MAX = 1.0, 15.0
SHIFT_MIN, SHIFT_MAX = 1.0, 5.0
MAX_CUSTOM_TIMESTEPS = 20

TASK_TYPES = ("text2music", "cover", "repaint", "lego", "extract", "complete")
TASK_TYPES_TURBO = ("text2music", "repaint", "cover")
TRACK_TASKS = ("lego", "extract")      # take one track name
TRACK_NAMES = (
    "woodwinds", "brass", "fx", "synth", "strings", "percussion",
    "keyboard", "guitar", "bass", "drums", "backing_vocals", "vocals",
)
INFER_METHODS = ("ode", "sde")
AUDIO_FORMATS = ("flac", "wav", "mp3", "ogg")

VALID_LANGUAGES = (
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he", "hi",
    "hr", "ht", "hu", "id", "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no", "pa", "pl",
    "pt", "ro", "ru", "sa", "sk", "sr", "sv", "sw", "ta", "te", "th", "tl", "tr", "uk", "ur", "vi",
    "yue", "zh", "unknown",
)

_NOTES = ("A", "B", "C", "D", "E", "F", "G")
_ACCIDENTALS = ("", "#", "b", "\u266f", "\u266d")
KEYSCALES = tuple(f"{n}{a} {m}" for n in _NOTES for a in _ACCIDENTALS for m in ("major", "minor"))

DEFAULT_DIT_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
NO_USER_INPUT = "NO USER INPUT"
