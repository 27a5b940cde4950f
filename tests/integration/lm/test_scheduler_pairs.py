"""``PairedScheduler`` driven step by step without a model (vLLM's real scheduler and KV manager).

A stand-in for the model runner samples one token per scheduled sequence the way the logits
processor does: both sequences of a pair get the same token, which depends only on the request and
the step. The KV cache is kept small so that vLLM has to preempt.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

import torch
from vllm import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.engine import FinishReason
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from lm_service.engine.config import LmEngineConfig
from lm_service.engine.scheduler import PAIR_ERROR_PREFIX, PairedScheduler
from lm_service.engine.types import SamplingSettings
from lm_service.engine.vllm_engine import engine_args
from lm_service.engine.wire import RowArgs, RowRole, read_row_args, twin_request_id

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 512
STOP_TOKEN = 3


class UnsteeredScheduler(PairedScheduler):
    """vLLM's scheduling with our pairing checks but without the steering (to show why it exists)."""

    def _make_decode_room(self) -> bool:
        return False

    def _hold_back_waiting(self, admit: bool) -> list[Request]:
        return []


@pytest.fixture(scope="module")
def vllm_config(lm_dir: Path):
    config = LmEngineConfig(model_dir=lm_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=8)
    return engine_args(config, str(lm_dir)).create_engine_config()


def _scheduler(vllm_config, num_blocks: int, cls=PairedScheduler) -> PairedScheduler:
    block_size = vllm_config.cache_config.block_size
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=64, dtype=torch.float32)
    groups = [KVCacheGroupSpec(["layer"], spec)]
    kv_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=True,
    )


def _request(request_id: str, prompt: list[int], max_tokens: int, uncond: list[int] | None, block_size: int) -> Request:
    init_none_hash(sha256)
    args = RowArgs(
        key=request_id,
        role=RowRole.COND if uncond else RowRole.SINGLE,
        settings=SamplingSettings(temperature=0.0, cfg_scale=2.0 if uncond else 1.0, stop_token_ids=(STOP_TOKEN,)),
        uncond_prompt_token_ids=tuple(uncond) if uncond else None,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, stop_token_ids=[STOP_TOKEN],
                            extra_args=args.to_extra_args())
    return Request(request_id, prompt, params, None, block_hasher=get_request_block_hasher(block_size, sha256))


def _token(key: str, step: int) -> int:
    """What the processor would pick: the same for both sequences of a request."""
    return 10 + zlib.crc32(f"{key}:{step}".encode()) % 1000


class Driver:
    """Runs schedule -> fake model -> update_from_output and records what the frontend sees."""

    def __init__(self, scheduler: PairedScheduler, corrupt_twin_at: int = -1) -> None:
        self.scheduler = scheduler
        self.corrupt_twin_at = corrupt_twin_at  # a step at which twins get a different token
        self.outputs: dict[str, list[int]] = {}
        self.finish: dict[str, tuple[FinishReason, object]] = {}
        self.num_preempted = 0
        self.split_steps = 0

    def step(self) -> None:
        scheduler = self.scheduler
        out = scheduler.schedule()
        self.num_preempted += len(out.preempted_req_ids)
        ids = list(out.num_scheduled_tokens)
        for pair in scheduler.pairs.pairs():
            self.split_steps += (pair.cond_id in ids) != (pair.twin_id in ids)
        sampled = []
        for request_id in ids:
            request = scheduler.requests[request_id]
            args = read_row_args(request.sampling_params.extra_args)
            step = len(request.output_token_ids)
            corrupt = args.role is RowRole.UNCOND and step == self.corrupt_twin_at
            sampled.append([_token(args.key, step) + (1 if corrupt else 0)])
        runner_output = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                          sampled_token_ids=sampled)
        for client_outputs in scheduler.update_from_output(out, runner_output).values():
            for output in client_outputs.outputs:
                assert not output.request_id.endswith("#uncond"), "a twin's output reached the frontend"
                self.outputs.setdefault(output.request_id, []).extend(output.new_token_ids)
                if output.finish_reason is not None:
                    self.finish[output.request_id] = (output.finish_reason, output.stop_reason)

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_requests():
                return
            self.step()
        raise AssertionError("the scheduler did not drain")


def test_pairs_stay_in_lock_step_through_preemption(vllm_config) -> None:
    scheduler = _scheduler(vllm_config, num_blocks=13)
    block_size = vllm_config.cache_config.block_size
    driver = Driver(scheduler)
    expected: dict[str, int] = {}
    for i in range(6):
        prompt = [100 + i] * (60 + 30 * i)
        uncond = [100 + i] * 20 if i % 3 != 2 else None
        scheduler.add_request(_request(f"r{i}", prompt, 150, uncond, block_size))
        expected[f"r{i}"] = 150
    driver.step()  # a late arrival joins a running batch
    scheduler.add_request(_request("late", [7] * 90, 120, [7] * 10, block_size))
    expected["late"] = 120
    driver.run()
    assert driver.num_preempted > 0, "the test must make vLLM preempt"
    assert driver.split_steps == 0
    for request_id, num_tokens in expected.items():
        assert driver.outputs[request_id] == [_token(request_id, step) for step in range(num_tokens)]
        assert driver.finish[request_id][0] == FinishReason.LENGTH
    assert len(scheduler.pairs) == 0
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 12  # every block is back


def test_vllm_alone_splits_a_pair_and_the_split_fails_the_request_loudly(vllm_config) -> None:
    """With the steering off, vLLM admits the conditional sequence into the last free slot
    without its twin; the pair checks turn that into an error for that request only."""
    block_size = vllm_config.cache_config.block_size
    for cls, expect_error in ((UnsteeredScheduler, True), (PairedScheduler, False)):
        scheduler = _scheduler(vllm_config, num_blocks=64, cls=cls)
        driver = Driver(scheduler)
        for i in range(7):  # max_num_seqs is 8: seven singles leave one slot
            scheduler.add_request(_request(f"s{i}", [50 + i] * 20, 40, None, block_size))
        scheduler.add_request(_request("pair", [9] * 20, 40, [8] * 5, block_size))
        driver.run()
        for i in range(7):
            assert driver.finish[f"s{i}"][0] == FinishReason.LENGTH
        reason, stop_reason = driver.finish["pair"]
        if expect_error:
            assert driver.split_steps > 0
            assert reason == FinishReason.ERROR and str(stop_reason).startswith(PAIR_ERROR_PREFIX)
        else:
            assert driver.split_steps == 0
            assert reason == FinishReason.LENGTH
            assert driver.outputs["pair"] == [_token("pair", step) for step in range(40)]


def test_diverging_tokens_fail_only_that_request(vllm_config) -> None:
    scheduler = _scheduler(vllm_config, num_blocks=32)
    block_size = vllm_config.cache_config.block_size
    driver = Driver(scheduler, corrupt_twin_at=5)
    scheduler.add_request(_request("pair", [5] * 30, 20, [6] * 10, block_size))
    scheduler.add_request(_request("solo", [7] * 30, 20, None, block_size))
    driver.run()
    reason, stop_reason = driver.finish["pair"]
    assert reason == FinishReason.ERROR
    assert stop_reason == PAIR_ERROR_PREFIX + "generated tokens differ at step 5: " + (
        f"{_token('pair', 5)} vs {_token('pair', 5) + 1}"
    )
    assert len(driver.outputs["pair"]) == 6  # it ends at the step where the streams diverged
    assert driver.finish["solo"][0] == FinishReason.LENGTH and len(driver.outputs["solo"]) == 20
    assert scheduler.get_request_counts() == (0, 0) and len(scheduler.pairs) == 0


def test_aborting_the_request_finishes_both_sequences_and_frees_their_blocks(vllm_config) -> None:
    scheduler = _scheduler(vllm_config, num_blocks=32)
    block_size = vllm_config.cache_config.block_size
    driver = Driver(scheduler)
    scheduler.add_request(_request("a", [5] * 200, 100, [6] * 150, block_size))
    for _ in range(3):
        driver.step()
    assert scheduler.get_request_counts() == (2, 0)
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.get_request_counts() == (0, 0)
    assert len(scheduler.pairs) == 0
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 31


def test_twin_reaching_max_model_len_ends_the_request(vllm_config) -> None:
    scheduler = _scheduler(vllm_config, num_blocks=32)
    block_size = vllm_config.cache_config.block_size
    driver = Driver(scheduler)
    scheduler.add_request(_request("long-uncond", [5] * 20, 100, [6] * (MAX_MODEL_LEN - 10), block_size))
    driver.run()
    assert driver.finish["long-uncond"][0] == FinishReason.LENGTH
    assert len(driver.outputs["long-uncond"]) == 10  # the twin filled max_model_len after 10 tokens
    assert scheduler.get_request_counts() == (0, 0)


def test_twin_of_an_unknown_request_is_never_created_for_single_sequences(vllm_config) -> None:
    scheduler = _scheduler(vllm_config, num_blocks=32)
    block_size = vllm_config.cache_config.block_size
    scheduler.add_request(_request("solo", [5] * 20, 10, None, block_size))
    assert twin_request_id("solo") not in scheduler.requests
    assert scheduler.get_request_counts() == (0, 1)


def test_a_kv_cache_that_cannot_hold_one_guided_pair_is_refused_at_start(vllm_config) -> None:
    blocks_per_sequence = -(-MAX_MODEL_LEN // vllm_config.cache_config.block_size)
    fits = _scheduler(vllm_config, num_blocks=4 * blocks_per_sequence)
    pair_blocks = 2 * blocks_per_sequence + fits.kv_cache_manager.watermark_blocks
    with pytest.raises(ValueError) as raised:
        _scheduler(vllm_config, num_blocks=pair_blocks - 1)
    message = str(raised.value)
    assert message.startswith("PairedScheduler: the KV cache holds"), message
    assert f"a guided pair at max_model_len {MAX_MODEL_LEN} needs {pair_blocks}" in message
    assert message.endswith("raise the KV cache size or lower max_model_len")


def test_an_error_finish_reaches_the_caller_as_internal_with_the_reason() -> None:
    from lm_service.engine.stats import RequestTimeline, StatsTracker
    from lm_service.engine.vllm_engine import finished_event
    from shared.errors import Internal

    timeline = RequestTimeline("r", 1, StatsTracker())
    timeline.add([5, 6])
    assert finished_event(timeline, "length", None).token_ids == (5, 6)
    with pytest.raises(Internal, match="generated tokens differ"):
        finished_event(timeline, "error", PAIR_ERROR_PREFIX + "generated tokens differ at step 1: 3 vs 4")
    with pytest.raises(Internal, match="finish reason 'error'"):
        finished_event(timeline, "error", None)
