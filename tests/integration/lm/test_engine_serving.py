"""Serving behaviour of the vLLM engine: abort, concurrency, constraints, load figures."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from lm_service.engine.types import ConstraintRef, FinishReason, LmGenerateRequest
from tests.integration.lm import constraint_fixtures
from tests.integration.lm.helpers import finish, random_prompt, run_all, run_one_by_one, wait_for_tokens

pytestmark = pytest.mark.vllm


async def _wait_idle(engine, timeout_s: float = 15.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    stats = engine.stats()
    while loop.time() < deadline:
        stats = engine.stats()
        if stats.num_running_seqs == 0 and stats.num_waiting_seqs == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"the engine did not go idle: {stats}")


def _guided(request_id: str, seed: int, vocab: int, max_tokens: int, **kwargs) -> LmGenerateRequest:
    rng = random.Random(seed)
    cond = random_prompt(rng, 40, vocab)
    return LmGenerateRequest(request_id, cond, max_tokens, uncond_prompt_token_ids=cond[:3] + (7, 8, 9),
                             cfg_scale=2.0, temperature=0.0, **kwargs)


async def test_abort_ends_the_stream_and_frees_both_sequences(vllm_engine) -> None:
    task, reached = await wait_for_tokens(vllm_engine.submit(_guided("doomed", 1, vllm_engine.vocab_size, 400)), 3)
    await reached.wait()
    assert vllm_engine.stats().num_running_seqs == 2  # the pair
    await vllm_engine.abort("doomed")
    final = await task
    assert final.finish_reason == FinishReason.ABORT
    assert 3 <= len(final.token_ids) < 400
    stats = await _wait_idle(vllm_engine)
    assert stats.kv_cache_usage == 0.0
    num_done = len(final.token_ids)
    again = await finish(vllm_engine.submit(_guided("doomed", 1, vllm_engine.vocab_size, num_done)))
    assert again.token_ids == final.token_ids  # the id is free again; the aborted tokens were right


def _request_of(engine_id: str) -> str:
    """Our request id from a vLLM engine id (``<id>-<hex>``, with ``#uncond`` on the twin)."""
    return engine_id.split("#", 1)[0].rsplit("-", 1)[0]


async def test_eight_requests_in_flight_run_in_the_same_steps(vllm_engine) -> None:
    vocab = vllm_engine.vocab_size
    requests = [_guided(f"c{i}", 100 + i, vocab, 48) if i % 2 else
                LmGenerateRequest(f"c{i}", random_prompt(random.Random(i), 40, vocab), 48, temperature=0.0)
                for i in range(8)]
    vllm_engine.step_log.write_text("")
    got = await run_all(vllm_engine, requests)
    assert all(len(out.token_ids) == 48 for out in got.values())
    # one engine step ran sequences of several requests (a guided pair alone would be two sequences
    # of ONE request): count distinct requests per step from the engine-core's step log
    steps = [json.loads(line) for line in vllm_engine.step_log.read_text().splitlines() if line]
    requests_per_step = [len({_request_of(engine_id) for engine_id in step}) for step in steps]
    assert max(requests_per_step) >= 4, requests_per_step
    stats = vllm_engine.stats()
    assert stats.tokens_per_s > 0 and stats.last_time_to_first_token_s > 0
    assert stats.num_generated_tokens >= 8 * 48


async def test_constraint_is_applied_after_guidance_and_matches_the_reference(vllm_engine, hf_engine) -> None:
    vocab = vllm_engine.vocab_size
    spec = {"first_code": 100, "num_codes": 50, "length": 12}
    ref = ConstraintRef(builder=constraint_fixtures.BUILDER, spec=spec, vocab_loader=constraint_fixtures.VOCAB_LOADER)
    stop = 5
    requests = [
        _guided("fsm-g", 200, vocab, 40, constraint=ref, stop_token_ids=(stop,)),
        LmGenerateRequest("fsm-p", random_prompt(random.Random(201), 30, vocab), 40, temperature=0.9, seed=3,
                          constraint=ref, stop_token_ids=(stop,)),
        _guided("free-g", 200, vocab, 13),
    ]
    got = await run_all(vllm_engine, requests)
    codes = constraint_fixtures.load_code_vocab(str(vllm_engine.config.model_dir))["code_ids"][100:150]
    for request_id in ("fsm-g", "fsm-p"):
        tokens = got[request_id].token_ids
        assert got[request_id].finish_reason == FinishReason.STOP
        assert len(tokens) == 13 and tokens[-1] == stop
        assert set(tokens[:-1]) <= set(codes)
    assert got["free-g"].token_ids != got["fsm-g"].token_ids
    expected = await run_one_by_one(hf_engine, requests[:2])
    for request_id, out in expected.items():
        assert got[request_id].token_ids == out.token_ids


async def test_a_failing_constraint_fails_only_its_own_request(vllm_engine) -> None:
    from shared.errors import Internal

    vocab = vllm_engine.vocab_size
    spec = {"first_code": 0, "num_codes": 50, "length": 100, "fail_after": 3}
    ref = ConstraintRef(builder=constraint_fixtures.BUILDER, spec=spec, vocab_loader=constraint_fixtures.VOCAB_LOADER)
    doomed = _guided("broken-fsm", 300, vocab, 20, constraint=ref, stop_token_ids=(5,))
    healthy = _guided("healthy", 301, vocab, 20)
    results = await asyncio.gather(finish(vllm_engine.submit(doomed)), finish(vllm_engine.submit(healthy)),
                                   return_exceptions=True)
    assert isinstance(results[0], Internal), results[0]
    assert "guided pair error" in results[0].message
    assert results[1].finish_reason == FinishReason.LENGTH and len(results[1].token_ids) == 20
    await _wait_idle(vllm_engine)


async def test_invalid_requests_are_refused_before_queueing(vllm_engine) -> None:
    from shared.errors import InvalidArgument

    vocab = vllm_engine.vocab_size
    with pytest.raises(InvalidArgument, match="uncond_prompt_token_ids"):
        vllm_engine.submit(LmGenerateRequest("bad", (1, 2, 3), 5, cfg_scale=2.0))
    with pytest.raises(InvalidArgument, match="prompt_token_ids"):
        vllm_engine.submit(LmGenerateRequest("bad", (1, vocab), 5))
    task, reached = await wait_for_tokens(vllm_engine.submit(_guided("dup", 3, vocab, 30)), 1)
    await reached.wait()
    with pytest.raises(InvalidArgument, match="in flight"):
        vllm_engine.submit(_guided("dup", 3, vocab, 30))
    await task


async def test_the_service_constraint_bridge_runs_inside_the_engine(vllm_engine, hf_engine) -> None:
    """The codes-phase FSM of ``lm_service.constraints``, built in vLLM's worker, after guidance."""
    from lm_service import constraint_bridge as bridge
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(vllm_engine.config.model_dir))
    text = ("<|im_start|>user\nan upbeat synth-pop track<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nbpm: 120\n</think>\n\n")
    cond = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    uncond = tuple(tokenizer("<|im_start|>user\nNO USER INPUT<|im_end|>\n", add_special_tokens=False)["input_ids"])
    ref = ConstraintRef(builder=f"{bridge.__name__}:build", spec={"phase": "codes", "target_codes": 10},
                        vocab_loader=f"{bridge.__name__}:load_vocab")
    request = LmGenerateRequest("codes", cond, 30, uncond_prompt_token_ids=uncond, cfg_scale=2.0, temperature=0.0,
                                constraint=ref, stop_token_ids=(tokenizer.eos_token_id,))
    got = await finish(vllm_engine.submit(request))
    tokens = tokenizer.convert_ids_to_tokens(list(got.token_ids))
    assert got.finish_reason == FinishReason.STOP and len(tokens) == 11
    assert all(t.startswith("<|audio_code_") for t in tokens[:10]) and tokens[-1] == "<|im_end|>"
    reference = await finish(hf_engine.submit(request))
    assert reference.token_ids == got.token_ids
