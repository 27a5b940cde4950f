"""The vLLM engine against the transformers reference: same tokens, with and without guidance,
whatever else is in the batch (greedy decoding, and seeded sampling)."""

from __future__ import annotations

import asyncio
import random

import pytest

from lm_service.engine.types import FinishReason, LmGenerateRequest
from tests.integration.lm.helpers import (
    codes_request,
    finish,
    random_prompt,
    run_all,
    run_one_by_one,
    wait_for_tokens,
)

pytestmark = pytest.mark.vllm

CFG_SCALE = 2.5


def _pair_inputs(seed: int, vocab_size: int, cond_len: int = 40, uncond_len: int = 12):
    rng = random.Random(seed)
    cond = random_prompt(rng, cond_len, vocab_size)
    uncond = cond[:4] + random_prompt(rng, uncond_len - 4, vocab_size)
    return cond, uncond


def _guided(request_id: str, cond, uncond, max_tokens: int, **kwargs) -> LmGenerateRequest:
    kwargs.setdefault("temperature", 0.0)
    return LmGenerateRequest(request_id, cond, max_tokens, uncond_prompt_token_ids=uncond, cfg_scale=CFG_SCALE,
                             **kwargs)


def _plain(request_id: str, cond, max_tokens: int, **kwargs) -> LmGenerateRequest:
    kwargs.setdefault("temperature", 0.0)
    return LmGenerateRequest(request_id, cond, max_tokens, **kwargs)


def _assert_same(vllm_out, reference_out) -> None:
    for request_id, expected in reference_out.items():
        got = vllm_out[request_id]
        assert got.token_ids == expected.token_ids, f"{request_id} differs from the reference"
        assert got.finish_reason == expected.finish_reason


async def test_guidance_changes_greedy_output_and_both_match_the_reference(vllm_engine, hf_engine) -> None:
    vocab = vllm_engine.vocab_size
    requests = []
    for i in range(3):
        cond, uncond = _pair_inputs(i, vocab)
        requests += [_guided(f"g{i}", cond, uncond, 24), _plain(f"p{i}", cond, 24)]
    got = await run_all(vllm_engine, requests)
    expected = await run_one_by_one(hf_engine, requests)
    for i in range(3):
        assert got[f"g{i}"].token_ids != got[f"p{i}"].token_ids, "guidance must change the greedy output"
    _assert_same(got, expected)


async def test_a_pair_arriving_while_others_run_matches_the_reference(vllm_engine, hf_engine) -> None:
    vocab = vllm_engine.vocab_size
    early = [_plain(f"early{i}", _pair_inputs(10 + i, vocab)[0], 60) for i in range(2)]
    early.append(_guided("early-g", *_pair_inputs(12, vocab), 60))
    tasks = []
    for request in early:
        task, reached = await wait_for_tokens(vllm_engine.submit(request), 5)
        tasks.append((task, reached))
    await asyncio.gather(*(reached.wait() for _, reached in tasks))
    late = [_guided("late-g", *_pair_inputs(13, vocab), 30), _plain("late-p", _pair_inputs(14, vocab)[0], 30)]
    got = await run_all(vllm_engine, late)
    got.update({r.request_id: await task for r, (task, _) in zip(early, tasks)})
    assert all(len(got[r.request_id].token_ids) == 60 for r in early)
    _assert_same(got, await run_one_by_one(hf_engine, early + late))


async def test_requests_submitted_one_by_one_match_the_reference(vllm_engine, hf_engine) -> None:
    vocab = vllm_engine.vocab_size
    requests = [
        _guided("one-0", *_pair_inputs(20, vocab), 30),
        _plain("one-1", _pair_inputs(21, vocab)[0], 30),
        _guided("one-2", *_pair_inputs(22, vocab, cond_len=70, uncond_len=30), 30),
    ]
    tasks = []
    for request in requests:  # each arrives after the previous one produced tokens
        task, reached = await wait_for_tokens(vllm_engine.submit(request), 3)
        await reached.wait()
        tasks.append(task)
    got = {r.request_id: await t for r, t in zip(requests, tasks)}
    _assert_same(got, await run_one_by_one(hf_engine, requests))


async def test_seeded_sampling_is_reproducible_whatever_else_runs(vllm_engine, hf_engine) -> None:
    vocab = vllm_engine.vocab_size
    cond, uncond = _pair_inputs(30, vocab)
    settings = dict(temperature=1.0, top_p=0.95)
    alone = await finish(vllm_engine.submit(_guided("seed-a", cond, uncond, 40, seed=123, **settings)))
    crowd = [_plain(f"noise{i}", _pair_inputs(31 + i, vocab)[0], 40, temperature=1.0, seed=i) for i in range(3)]
    crowd.append(_guided("seed-b", cond, uncond, 40, seed=123, **settings))
    crowd.append(_guided("seed-c", cond, uncond, 40, seed=124, **settings))
    got = await run_all(vllm_engine, crowd)
    assert got["seed-b"].token_ids == alone.token_ids
    assert got["seed-c"].token_ids != alone.token_ids
    assert alone.seed == 123
    reference = await finish(hf_engine.submit(_guided("seed-ref", cond, uncond, 40, seed=123, **settings)))
    assert reference.token_ids == alone.token_ids


async def test_sampled_codes_are_the_same_alone_among_other_requests_and_on_the_reference(vllm_engine, hf_engine) -> None:
    """Codes-phase rows are decided in the codes+EOS window, batched with whatever else runs; the
    transformers backend computes only that window's head rows."""
    model_dir = vllm_engine.config.model_dir
    settings = dict(temperature=0.9, top_p=0.95, seed=77)
    alone = await finish(vllm_engine.submit(codes_request(model_dir, "codes-alone", CFG_SCALE, **settings)))
    mates = [codes_request(model_dir, f"codes-mate{i}", CFG_SCALE if i else 1.0, temperature=1.0, top_k=200, seed=i)
             for i in range(2)]
    text_mate = _plain("text-mate", _pair_inputs(70, vllm_engine.vocab_size)[0], 30, temperature=1.0, top_p=0.8,
                       repetition_penalty=1.2, seed=9)
    got = await run_all(vllm_engine, mates + [text_mate, codes_request(model_dir, "codes-crowd", CFG_SCALE, **settings)])
    assert got["codes-crowd"].token_ids == alone.token_ids
    assert len(alone.token_ids) == 25 and alone.finish_reason == FinishReason.STOP
    assert len({got[r.request_id].token_ids for r in mates} | {alone.token_ids}) == 3
    reference = await run_one_by_one(hf_engine, mates + [codes_request(model_dir, "codes-ref", CFG_SCALE, **settings)])
    assert reference["codes-ref"].token_ids == alone.token_ids
    _assert_same(got, {r.request_id: reference[r.request_id] for r in mates})


async def test_sampling_parameters_take_effect(vllm_engine, hf_engine) -> None:
    vocab = vllm_engine.vocab_size
    cond, uncond = _pair_inputs(40, vocab)
    requests = [
        _guided("greedy", cond, uncond, 30),
        _guided("topk1", cond, uncond, 30, temperature=1.0, top_k=1, seed=5),
        _guided("tiny-top-p", cond, uncond, 30, temperature=1.0, top_p=1e-6, seed=5),
        _guided("sampled", cond, uncond, 30, temperature=1.0, seed=5),
        _guided("penalized", cond, uncond, 30, repetition_penalty=0.05),  # < 1 favours seen tokens
    ]
    got = await run_all(vllm_engine, requests)
    greedy = got["greedy"].token_ids
    assert got["topk1"].token_ids == greedy
    assert got["tiny-top-p"].token_ids == greedy
    assert got["sampled"].token_ids != greedy
    assert got["penalized"].token_ids != greedy
    _assert_same({"penalized": got["penalized"]}, await run_one_by_one(hf_engine, requests[-1:]))


async def test_preemption_keeps_pairs_exact(vllm_engine, hf_engine) -> None:
    vocab = vllm_engine.vocab_size
    before = vllm_engine.stats().num_preemptions
    requests = [_guided(f"big{i}", *_pair_inputs(50 + i, vocab, cond_len=250, uncond_len=130), 140) for i in range(4)]
    got = await run_all(vllm_engine, requests)
    assert vllm_engine.stats().num_preemptions > before, "the KV cache is sized so that this preempts"
    _assert_same(got, await run_one_by_one(hf_engine, requests))


async def test_stop_token_ends_both_sequences(vllm_engine, hf_engine) -> None:
    vocab = vllm_engine.vocab_size
    cond, uncond = _pair_inputs(60, vocab)
    probe = await finish(vllm_engine.submit(_guided("probe", cond, uncond, 20)))
    stop = probe.token_ids[7]
    request = _guided("stopped", cond, uncond, 20, stop_token_ids=(stop,))
    got = await finish(vllm_engine.submit(request))
    assert got.finish_reason == FinishReason.STOP
    assert got.token_ids == probe.token_ids[: probe.token_ids.index(stop) + 1]
    assert vllm_engine.stats().num_running_seqs == 0 or await _drained(vllm_engine)
    _assert_same({"stopped": got}, await run_one_by_one(hf_engine, [request]))


async def _drained(engine, timeout_s: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        stats = engine.stats()
        if stats.num_running_seqs == 0 and stats.num_waiting_seqs == 0:
            return True
        await asyncio.sleep(0.05)
    return False
