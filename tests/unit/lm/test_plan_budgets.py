"""Token budgets of a plan: the reference's, except that a user's duration is never cut short."""

from __future__ import annotations

import asyncio

import pytest

from lm_service.plan import PlanInput, Planner, max_new_tokens
from lm_service.prompts import default_chat_template
from lm_service.runtime import LmRuntime
from shared.types import GenerationParams
from tests.unit.lm.test_task_round_trip import ScriptedEngine
from devtools.tiny_checkpoints import build_lm_tokenizer


def test_reference_budgets() -> None:
    assert max_new_tokens(10.0, "codes", max_duration_s=240) == 60
    assert max_new_tokens(12.4, "codes", max_duration_s=240) == 72
    assert max_new_tokens(None, "cot") == 3500 and max_new_tokens(-1.0, "understand") == 3500
    assert max_new_tokens(300.0, "codes", max_duration_s=240) == 1210  # clamped to the tier's maximum
    assert max_new_tokens(None, "cot", max_model_len=2048) == 2048 - 64


@pytest.mark.parametrize("max_text_tokens, expected", [(0, 3500), (384, 384)])
def test_plan_budgets(tmp_path, monkeypatch, max_text_tokens: int, expected: int) -> None:
    monkeypatch.setenv("ACESTEP_LM_MAX_DURATION_S", "30")
    tokenizer = build_lm_tokenizer(tmp_path)
    engine = ScriptedEngine(tokenizer)
    runtime = LmRuntime(engine, tokenizer, default_chat_template(), 4096, max_text_tokens)
    calls = []
    runtime.observers.append(calls.append)
    engine.text = "<think>\nbpm: 90\n<|im_end|>"
    params = GenerationParams(caption="x", duration=100.0, thinking=True)

    async def plan() -> None:
        async for _ in Planner(runtime).plan(PlanInput("p", params, (1,))):
            pass

    asyncio.run(plan())
    cot, codes = sorted(calls, key=lambda call: ":codes:" in call.request.request_id)
    assert cot.request.max_tokens == expected
    assert codes.request.max_tokens == 100 * 5 + 10  # not the tier's 30 s clamp (160)
