"""What the LM tasks return is always valid input to the service, whatever the LM wrote.

A scripted engine stands in for the model (the tasks' own prompt building, parsing and result
shaping run unchanged): hostile outputs - captions of thousands of characters, numbers out of
range or not numbers, keyscales with line breaks, unknown languages - go through understand,
create_sample and format_sample, and each result is fed back as ``GenerationParams`` and
``FormatSampleParams`` to the gateway's validation.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_service.engine.types import FinishReason, LmFinished
from lm_service.prompts import default_chat_template
from lm_service.runtime import LmRuntime
from lm_service.tasks import LmTasks
from shared.constants import CAPTION_MAX_CHARS
from devtools.tiny_checkpoints import build_lm_tokenizer
from shared.types import (
    CreateSampleParams,
    FormatSampleParams,
    GenerationConfig,
    GenerationParams,
    MusicMetadata,
    UnderstandParams,
)
from shared.validation import validate_format_sample, validate_generation


class ScriptedEngine:
    """Answers every request with the token ids of a given text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""

    async def submit(self, request):
        ids = tuple(self.tokenizer.encode(self.text, add_special_tokens=False))
        yield LmFinished(request.request_id, ids, FinishReason.STOP, 0, 0.0, 0.0)

    async def abort(self, request_id: str) -> None:
        return None


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    tokenizer = build_lm_tokenizer(tmp_path_factory.mktemp("tok"))
    return LmRuntime(ScriptedEngine(tokenizer), tokenizer, default_chat_template(), 4096)


words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
numbers = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(str), words)
long_caption = st.lists(words, min_size=0, max_size=200).map(" ".join)


@st.composite
def lm_outputs(draw) -> str:
    fields = {
        "bpm": draw(numbers), "caption": draw(long_caption), "duration": draw(numbers),
        "keyscale": draw(st.one_of(words, st.sampled_from(["Am", "C Major", "F# minor", "H dur"]))),
        "language": draw(st.one_of(words, st.sampled_from(["en", "zh", "xx", "unknown"]))),
        "timesignature": draw(st.one_of(words, st.sampled_from(["4", "3/4", "7/8"]))),
        "genres": draw(words),
    }
    lines = [f"{name}: {value}" for name, value in fields.items() if draw(st.booleans())]
    lyrics = draw(st.lists(words, max_size=300).map("\n".join))
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\n" + lyrics + "<|im_end|>"


def _as_generation(result) -> GenerationParams:
    # A result may hold neither caption nor lyrics (the LM wrote none); text2music needs one of
    # them, which the user then supplies: the claim here is about the values the LM did write.
    caption = result.caption if result.caption or result.lyrics else "a caption of the user's"
    return GenerationParams(caption=caption, lyrics=result.lyrics, bpm=result.bpm,
                            duration=result.duration if result.duration is not None else -1.0,
                            keyscale=result.keyscale, timesignature=result.timesignature,
                            vocal_language=result.language or "unknown")


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(text=lm_outputs())
def test_task_results_are_valid_generation_input(runtime, text: str) -> None:
    runtime.engine.text = text
    tasks = LmTasks(runtime)

    async def run_all():
        return (await tasks.understand("u", UnderstandParams(audio_codes="<|audio_code_1|>")),
                await tasks.create_sample("c", CreateSampleParams(query="a song")),
                await tasks.format_sample("f", FormatSampleParams(caption="x", lyrics="y")))

    for result in asyncio.run(run_all()):
        assert len(result.caption) <= CAPTION_MAX_CHARS
        validate_generation(_as_generation(result), GenerationConfig())
        user = MusicMetadata(bpm=result.bpm, duration=result.duration, keyscale=result.keyscale,
                             timesignature=result.timesignature, language=result.language)
        validate_format_sample(FormatSampleParams(caption=result.caption, lyrics=result.lyrics, user_metadata=user))


def test_a_long_caption_is_cut_at_a_word_boundary(runtime) -> None:
    runtime.engine.text = "<think>\ncaption: " + "word " * 400 + "\n</think>\n\nla la<|im_end|>"
    result = asyncio.run(LmTasks(runtime).understand("u", UnderstandParams(audio_codes="<|audio_code_1|>")))
    assert 0 < len(result.caption) <= CAPTION_MAX_CHARS
    assert result.caption.endswith("word") and "  " not in result.caption
    assert result.lyrics == "la la"
