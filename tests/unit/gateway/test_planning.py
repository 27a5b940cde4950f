"""The gateway's pure decisions: when the LM runs, seeds, metadata merge, item keys, admission."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from gateway import planning
from shared.admission import Admission
from shared.errors import ResourceExhausted
from shared.types import GenerationConfig, GenerationParams, MusicMetadata


@pytest.mark.parametrize(
    "changes, use_lm, need_codes",
    [
        ({}, True, True),
        ({"thinking": False}, True, False),
        ({"thinking": False, "use_cot_metas": False, "use_cot_caption": False, "use_cot_language": False},
         False, False),
        ({"audio_codes": "<|audio_code_1|>"}, True, False),
        ({"task_type": "cover", "src_audio": b"x"}, True, False),  # the seed's "Style Cover with LM Reasoning"
        ({"task_type": "cover", "src_audio": b"x", "thinking": False, "use_cot_metas": False,
          "use_cot_caption": False, "use_cot_language": False}, False, False),
        ({"task_type": "repaint", "src_audio": b"x"}, False, False),
        ({"task_type": "lego", "src_audio": b"x", "instruction": "Generate the drums track"}, True, False),
    ],
)
def test_decide_lm(changes: dict, use_lm: bool, need_codes: bool) -> None:
    decision = planning.decide_lm(dataclasses.replace(GenerationParams(), **changes), lm_available=True)
    assert (decision.use_lm, decision.need_codes) == (use_lm, need_codes)


def test_no_lm_configured_skips_it() -> None:
    assert not planning.decide_lm(GenerationParams(), lm_available=False).use_lm


@pytest.mark.parametrize(
    "params, config, expected",
    [
        # a list: used in order, padded with random seeds; -1 means random for that item
        (GenerationParams(seed=99), GenerationConfig(batch_size=3, seeds=[42, 123]), [42, 123, None]),
        (GenerationParams(), GenerationConfig(batch_size=2, seeds=[-1, 8]), [None, 8]),
        # a single int: the first item's seed
        (GenerationParams(), GenerationConfig(batch_size=2, seeds=7), [7, None]),
        # no seeds: params.seed when use_random_seed is off, random when it is on
        (GenerationParams(seed=42), GenerationConfig(batch_size=2, use_random_seed=False), [42, None]),
        (GenerationParams(seed=42), GenerationConfig(batch_size=1, use_random_seed=True), [None]),
        (GenerationParams(seed=-1), GenerationConfig(batch_size=1, use_random_seed=False), [None]),
    ],
)
def test_seed_rules_of_the_documents(params, config, expected) -> None:
    seeds = planning.resolve_seeds(params, config, random.Random(3))
    assert len(seeds) == config.batch_size and all(0 <= s < 2**32 for s in seeds)
    for got, want in zip(seeds, expected):
        assert want is None or got == want
    again = planning.resolve_seeds(params, config, random.Random(4))
    fixed = [i for i, want in enumerate(expected) if want is not None]
    random_items = [i for i, want in enumerate(expected) if want is None]
    assert [again[i] for i in fixed] == [seeds[i] for i in fixed]
    assert all(again[i] != seeds[i] for i in random_items)  # drawn, not constant


@pytest.mark.parametrize(
    "lyrics, seconds",
    [
        ("", 30.0), ("[Instrumental]", 30.0),
        ("[Verse]\n" + "word " * 40 + "\n[Chorus]\n" + "la " * 20, 60 / 2 + 2 * 4 + 10),
        ("[Verse]\n" + "word " * 2000, 600.0),
        ("hi", 10.0),
    ],
)
def test_automatic_duration_without_the_lm_comes_from_the_lyrics(lyrics: str, seconds: float) -> None:
    filled = planning.fill_duration(GenerationParams(caption="x", lyrics=lyrics, duration=-1))
    assert filled.duration == seconds
    assert planning.fill_duration(GenerationParams(caption="x", lyrics=lyrics, duration=45.0)).duration == 45.0
    instrumental = planning.fill_duration(GenerationParams(caption="x", lyrics=lyrics, instrumental=True))
    assert instrumental.duration == 30.0
    codes = GenerationParams(caption="x", lyrics=lyrics, audio_codes="<|audio_code_1|>")
    assert planning.fill_duration(codes).duration == -1.0  # the codes fix the length


def test_seeds_given_then_padded_randomly() -> None:
    rng = random.Random(0)
    seeds = planning.resolve_seeds(GenerationParams(), GenerationConfig(batch_size=4, seeds=[7, -1]), rng)
    assert seeds[0] == 7 and len(seeds) == 4 and all(0 <= s < 2**32 for s in seeds)
    fixed = planning.resolve_seeds(GenerationParams(seed=5), GenerationConfig(batch_size=2, use_random_seed=False),
                                   rng)
    assert fixed[0] == 5 and len(fixed) == 2
    assert planning.resolve_seeds(GenerationParams(), GenerationConfig(batch_size=1, seeds=[1, 2, 3])) == [1]


def test_merge_fills_only_open_fields() -> None:
    params = GenerationParams(bpm=90, caption="mine", duration=-1.0)
    lm = MusicMetadata(bpm=120, keyscale="C major", timesignature="4", duration=42.0, language="en",
                       caption="x " * 400)
    merged = planning.merge_lm_metadata(params, lm)
    assert merged.bpm == 90 and merged.cot_bpm == 120
    assert merged.keyscale == "C major" and merged.duration == 42.0 and merged.vocal_language == "en"
    assert len(merged.caption) <= 512 and merged.cot_caption == lm.caption
    kept = planning.merge_lm_metadata(dataclasses.replace(params, use_cot_caption=False), lm)
    assert kept.caption == "mine"


def test_item_key_is_stable_and_parameter_sensitive() -> None:
    a = planning.item_params(GenerationParams(caption="c", src_audio=b"abc"), 1, [5, 6])
    b = planning.item_params(GenerationParams(caption="c", src_audio=b"abc"), 1, [5, 6])
    c = planning.item_params(GenerationParams(caption="c", src_audio=b"abc"), 2, [5, 6])
    assert planning.item_key(a) == planning.item_key(b) != planning.item_key(c)
    assert a.audio_codes == "<|audio_code_5|><|audio_code_6|>"


async def test_admission_queues_in_order_and_refuses_beyond_the_line() -> None:
    admission = Admission("gateway", max_active=1, max_queued=1)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(name: str) -> None:
        async with admission.slot():
            order.append(name)
            await release.wait()

    first = asyncio.ensure_future(hold("first"))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(hold("second"))
    await asyncio.sleep(0)
    assert admission.queue_position() == 1
    with pytest.raises(ResourceExhausted, match="gateway is at capacity"):
        admission.check_capacity()
    with pytest.raises(ResourceExhausted):
        async with admission.slot():
            pass
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first", "second"] and admission.active == 0
