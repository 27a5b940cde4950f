"""Small helpers of the LM engine tests."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator

from lm_service.engine.types import ConstraintRef, LmEvent, LmFinished, LmGenerateRequest, LmProgress


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(rng.randrange(5, vocab_size) if rng.random() < 0.5 else rng.randrange(5, 900) for _ in range(length))


async def finish(events: AsyncIterator[LmEvent]) -> LmFinished:
    """Drain a stream; check that progress is cumulative and ends as the final output."""
    seen: tuple[int, ...] = ()
    async for event in events:
        if isinstance(event, LmProgress):
            assert event.token_ids[: len(seen)] == seen
            seen = event.token_ids
        else:
            assert event.token_ids[: len(seen)] == seen
            return event
    raise AssertionError("the stream ended without a final event")


async def run_all(engine, requests: list[LmGenerateRequest]) -> dict[str, LmFinished]:
    """Submit every request at once and wait for all."""
    results = await asyncio.gather(*(finish(engine.submit(r)) for r in requests))
    return {r.request_id: out for r, out in zip(requests, results)}


async def run_one_by_one(engine, requests: list[LmGenerateRequest]) -> dict[str, LmFinished]:
    """Sequentially on the reference engine."""
    return {r.request_id: await finish(engine.submit(r)) for r in requests}


async def wait_for_tokens(events: AsyncIterator[LmEvent], num_tokens: int) -> tuple[asyncio.Task, asyncio.Event]:
    """Consume ``events`` in a task; the event is set once ``num_tokens`` tokens arrived."""
    reached = asyncio.Event()

    async def consume() -> LmFinished:
        async for event in events:
            if len(event.token_ids) >= num_tokens:
                reached.set()
            if isinstance(event, LmFinished):
                reached.set()
                return event
        raise AssertionError("the stream ended without a final event")

    return asyncio.create_task(consume()), reached


def codes_request(model_dir, request_id: str, cfg_scale: float, num_codes: int = 24, **sampling) -> LmGenerateRequest:
    """A codes-phase request under the service's codes constraint (exactly ``num_codes`` codes, then EOS)."""
    from lm_service import constraint_bridge as bridge

    tokenizer = _tokenizer(str(model_dir))
    text = ("<|im_start|>user\nan upbeat synth-pop track<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nbpm: 120\n</think>\n\n")
    cond = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    uncond = tuple(tokenizer("<|im_start|>user\nNO USER INPUT<|im_end|>\n", add_special_tokens=False)["input_ids"])
    ref = ConstraintRef(builder=f"{bridge.__name__}:build", spec={"phase": "codes", "target_codes": num_codes},
                        vocab_loader=f"{bridge.__name__}:load_vocab")
    guided = dict(uncond_prompt_token_ids=uncond, cfg_scale=cfg_scale) if cfg_scale > 1 else {}
    return LmGenerateRequest(request_id, cond, num_codes + 10, constraint=ref, stop_token_ids=(tokenizer.eos_token_id,),
                             **guided, **sampling)


@functools.lru_cache(maxsize=2)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
