"""The transformers backend (the reference the vLLM engine is checked against; no vLLM needed)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lm_service.engine.types import ConstraintRef, FinishReason, LmGenerateRequest
from shared.errors import InvalidArgument, NotReady
from tests.integration.lm import constraint_fixtures
from tests.integration.lm.helpers import codes_request, finish, random_prompt, wait_for_tokens


def _recompute_guided_greedy(model, cond: list[int], uncond: list[int], scale: float, num_tokens: int) -> list[int]:
    """Full forward passes over each unpadded stream at every step (no cache, no batch)."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(num_tokens):
            c = model(torch.tensor([cond + out])).logits[0, -1].float()
            u = model(torch.tensor([uncond + out])).logits[0, -1].float()
            out.append(int(torch.argmax(u + scale * (c - u))))
    return out


async def test_padded_cached_batch_equals_a_plain_recomputation(hf_engine, lm_dir) -> None:
    rng = random.Random(7)
    vocab = hf_engine.vocab_size
    cond = list(random_prompt(rng, 30, vocab))
    uncond = cond[:2] + list(random_prompt(rng, 9, vocab))  # shorter: left padding is exercised
    model = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32).eval()
    expected = _recompute_guided_greedy(model, cond, uncond, 3.0, 12)
    request = LmGenerateRequest("hf-ref", tuple(cond), 12, uncond_prompt_token_ids=tuple(uncond), cfg_scale=3.0,
                                temperature=0.0)
    got = await finish(hf_engine.submit(request))
    assert list(got.token_ids) == expected
    assert got.finish_reason == FinishReason.LENGTH
    unguided = _recompute_guided_greedy(model, cond, cond, 3.0, 12)
    assert unguided != expected, "the test model must be one where guidance matters"


async def test_abort_stops_the_running_request(hf_engine) -> None:
    request = LmGenerateRequest("hf-abort", random_prompt(random.Random(1), 20, hf_engine.vocab_size), 300,
                                temperature=0.0)
    task, reached = await wait_for_tokens(hf_engine.submit(request), 2)
    await reached.wait()
    await hf_engine.abort("hf-abort")
    final = await task
    assert final.finish_reason == FinishReason.ABORT and len(final.token_ids) < 300
    assert hf_engine.stats().num_running_seqs == 0


async def test_constraint_and_stop_token(hf_engine) -> None:
    ref = ConstraintRef(builder=constraint_fixtures.BUILDER, spec={"first_code": 0, "num_codes": 20, "length": 6},
                        vocab_loader=constraint_fixtures.VOCAB_LOADER)
    prompt = random_prompt(random.Random(2), 20, hf_engine.vocab_size)
    request = LmGenerateRequest("hf-fsm", prompt, 50, temperature=1.0, seed=9, constraint=ref, stop_token_ids=(4,))
    got = await finish(hf_engine.submit(request))
    codes = set(constraint_fixtures.load_code_vocab(str(hf_engine.config.model_dir))["code_ids"][:20]) - set(prompt)
    assert got.finish_reason == FinishReason.STOP and got.token_ids[-1] == 4
    assert len(got.token_ids) == 7 and set(got.token_ids[:-1]) <= codes


async def test_requests_are_validated(hf_engine) -> None:
    vocab = hf_engine.vocab_size
    for bad, field in [
        (LmGenerateRequest("v", (1,), 5, temperature=-1.0), "temperature"),
        (LmGenerateRequest("v", (1,), 5, top_p=0.0), "top_p"),
        (LmGenerateRequest("v", (1,), 0), "max_tokens"),
        (LmGenerateRequest("v", (), 5), "prompt_token_ids"),
        (LmGenerateRequest("v", (1,), 5, cfg_scale=0.5), "cfg_scale"),
        (LmGenerateRequest("v", (1,), 5, cfg_scale=2.0, uncond_prompt_token_ids=(vocab,)), "uncond_prompt_token_ids"),
        (LmGenerateRequest("v", (1,) * 600, 5), "prompt_token_ids"),
        (LmGenerateRequest("v", (1,), 5, constraint=ConstraintRef(builder="x:y")), "stop_token_ids"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            hf_engine.submit(bad)
        assert info.value.field == field


async def test_an_engine_that_is_not_started_is_not_ready(engine_config) -> None:
    from lm_service.engine.hf_backend import HfLmEngine

    with pytest.raises(NotReady):
        HfLmEngine(engine_config).submit(LmGenerateRequest("x", (1,), 1))


def _generate(model, request: LmGenerateRequest, model_dir, reduced_head: bool) -> tuple[list[int], set[int]]:
    from lm_service.engine.hf_backend import HfGeneration

    generation = HfGeneration(model, request, request.seed or 0, 4096, str(model_dir), reduced_head=reduced_head)
    generation.prefill()
    widths, reason = {generation.num_logit_columns}, None
    while reason is None:
        _, reason = generation.step()
        widths.add(generation.num_logit_columns)
    return generation.output_token_ids, widths


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_the_head_reduced_to_codes_and_eos_gives_the_same_codes(lm_dir, cfg_scale) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32).eval()
    vocab_size = model.config.vocab_size
    cases = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.95, seed=1)]
    outputs = []
    for i, sampling in enumerate(cases):
        request = codes_request(lm_dir, f"head-{i}", cfg_scale, **sampling)
        reduced, reduced_widths = _generate(model, request, lm_dir, reduced_head=True)
        full, full_widths = _generate(model, request, lm_dir, reduced_head=False)
        assert reduced == full, f"case {sampling}"
        assert len(reduced) == 25
        assert full_widths == {vocab_size}
        assert reduced_widths == {64001}  # the 64000 audio codes and EOS, at every step
        outputs.append(reduced)
    assert len({tuple(out) for out in outputs}) == len(cases)
