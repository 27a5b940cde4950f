"""vLLM v1 scheduler that admits, schedules, preempts and finishes guided pairs together.

Plugged in through ``SchedulerConfig.scheduler_cls``; it runs in vLLM's engine-core process.
A guided request reaches the engine as ONE sequence (the conditional one) whose ``extra_args``
carry the unconditional prompt; ``add_request`` creates the unconditional twin right here, so the
frontend only ever sees the conditional sequence.

vLLM's own ``Scheduler.schedule`` is kept as it is and steered around it:

* before it runs, ``_make_decode_room`` preempts whole pairs from the tail of the running queue
  until every running sequence can get its next KV slot, so vLLM never preempts inside its loop
  (it would pick one sequence of a pair);
* ``_hold_back_waiting`` groups each waiting pair (cond then twin) and hides the waiting groups
  that would not fit this step (token budget, sequence slots, KV blocks, with costs that ignore
  prefix hits and so bound vLLM's), so vLLM admits every group it sees whole;
* after it runs, ``_check_scheduled_together`` verifies that both sequences of every pair are in
  the step or neither is.

Chunked prefill must be off (a prompt is prefilled in one step or not at all) and scheduling
synchronous; ``__init__`` refuses other configurations. After every step ``update_from_output``
checks that both sequences generated identical tokens, finishes a sequence whose partner finished
(e.g. the longer prompt reached ``max_model_len``), fails a broken pair with
``FinishReason.ERROR`` (the reason in ``stop_reason``) and drops the twin's outputs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from collections.abc import Iterable
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from lm_service.engine.pairing import (
    Capacity,
    PairLink,
    PairRegistry,
    count_admissible,
    describe_misalignment,
    group_cost,
    group_waiting,
    sequence_cost,
)
from lm_service.engine.wire import UNCOND_SUFFIX, RowRole, read_row_args, twin_request_id

PAIR_ERROR_PREFIX = "guided pair error: "


# When set, every engine step appends the engine request ids it scheduled (a JSON list) to this file.
STEP_LOG_ENV = "ACESTEP_LM_STEP_LOG"

class PairedScheduler(Scheduler):
    """``vllm.v1.core.sched.scheduler.Scheduler`` that keeps guided pairs in lock-step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_supported_config()
        self.pairs = PairRegistry()
        self._step_log = os.environ.get(STEP_LOG_ENV) or None

    def _check_supported_config(self) -> None:
        config = self.scheduler_config
        problems = []
        if config.enable_chunked_prefill:
            problems.append("chunked prefill must be disabled (enable_chunked_prefill=False)")
        if config.async_scheduling:
            problems.append("scheduling must be synchronous (async_scheduling=False)")
        if self.policy != SchedulingPolicy.FCFS:
            problems.append("the scheduling policy must be 'fcfs'")
        if self.vllm_config.speculative_config is not None:
            problems.append("speculative decoding is not supported")
        if self.connector is not None:
            problems.append("KV connectors are not supported")
        if self.max_num_scheduled_tokens < 2 * self.max_model_len:
            problems.append(
                f"max_num_batched_tokens ({self.max_num_scheduled_tokens}) must be >= 2 * max_model_len "
                f"({2 * self.max_model_len}) so a pair of full-length prompts fits one step"
            )
        pair_blocks = 2 * -(-self.max_model_len // self.block_size) + self.kv_cache_manager.watermark_blocks
        total_blocks = self.kv_cache_manager.block_pool.get_num_free_blocks()
        if pair_blocks > total_blocks:
            problems.append(
                f"the KV cache holds {total_blocks} blocks of {self.block_size} tokens; a guided pair at "
                f"max_model_len {self.max_model_len} needs {pair_blocks}: "
                "raise the KV cache size or lower max_model_len"
            )
        if problems:
            raise ValueError("PairedScheduler: " + "; ".join(problems))

    def add_request(self, request: Request) -> None:
        """Queue ``request``; a conditional sequence is queued with its new twin right behind it."""
        params = request.sampling_params
        args = read_row_args(params.extra_args if params is not None else None)
        if args is None or args.role is not RowRole.COND:
            super().add_request(request)
            return
        params.extra_args = replace(args, uncond_prompt_token_ids=None).to_extra_args()  # the worker needs none
        super().add_request(request)
        twin_params = params.clone()
        twin_params.extra_args = args.twin().to_extra_args()
        twin = Request(
            request_id=twin_request_id(request.request_id),
            prompt_token_ids=list(args.uncond_prompt_token_ids or ()),
            sampling_params=twin_params,
            pooling_params=None,
            client_index=request.client_index,
            arrival_time=request.arrival_time,
            cache_salt=request.cache_salt,
            priority=request.priority,
            block_hasher=request._block_hasher,
        )
        super().add_request(twin)
        self.pairs.link(request, twin)

    def finish_requests(
        self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus
    ) -> list[Request]:
        """Finish (e.g. abort) sequences; a paired sequence takes its partner with it."""
        if request_ids is not None:
            ids = (request_ids,) if isinstance(request_ids, str) else request_ids
            request_ids = self.pairs.with_partners(ids)
        finished = super().finish_requests(request_ids, finished_status)
        for pair in list(self.pairs.pairs()):
            if pair.cond.is_finished() and pair.twin.is_finished():
                self.pairs.unlink(pair)
        return finished

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        """vLLM's schedule, with pairs preempted and admitted whole (see the module docstring)."""
        preempted = self._make_decode_room()
        held_back = self._hold_back_waiting(admit=not preempted)
        try:
            output = super().schedule(throttle_prefills)
        finally:
            self.waiting.extend(held_back)
        self._check_scheduled_together(output)
        if self._step_log and output.num_scheduled_tokens:
            with open(self._step_log, "a", encoding="utf-8") as log_file:  # test and diagnostics hook
                log_file.write(json.dumps(sorted(output.num_scheduled_tokens)) + "\n")
        return output

    def _decode_block_need(self, request: Request) -> int:
        """KV blocks ``request`` needs beyond those it holds for what it computes next step."""
        num_new = request.num_tokens_with_spec + request.num_output_placeholders - request.num_computed_tokens
        if num_new <= 0:
            return 0
        num_tokens = min(request.num_computed_tokens + num_new + self.num_lookahead_tokens, self.max_model_len)
        num_held = len(self.kv_cache_manager.get_block_ids(request.request_id)[0])
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def _make_decode_room(self) -> bool:
        """Preempt whole groups from the running tail until all running sequences fit; True if any."""
        preempted = False
        block_pool = self.kv_cache_manager.block_pool
        while self.running:
            need = sum(self._decode_block_need(request) for request in self.running)
            if need <= block_pool.get_num_free_blocks():
                break
            victims = self._tail_group()
            for victim in victims:
                self.running.remove(victim)
            # Preempted sequences are pushed to the front of the waiting queue: push the twin
            # first so the conditional sequence ends up ahead of it.
            now = time.monotonic()
            for victim in reversed(victims):
                self._preempt_request(victim, now)
            preempted = True
        return preempted

    def _tail_group(self) -> list[Request]:
        """The last running sequence with its partner if that is running too, cond first."""
        last = self.running[-1]
        pair = self.pairs.get(last.request_id)
        if pair is None:
            return [last]
        return [member for member in (pair.cond, pair.twin) if member in self.running]

    def _hold_back_waiting(self, admit: bool) -> list[Request]:
        """Leave in ``self.waiting`` only the leading groups that fit this step; return the rest.

        A paired sequence waiting without its partner is never admitted; its pair is marked broken
        and fails at the end of the step.
        """
        groups, orphans = [], []
        for group in group_waiting(list(self.waiting), self.pairs):
            (orphans if self._is_orphan(group) else groups).append(group)
        num_admissible = 0
        if admit:
            costs = [group_cost(sequence_cost(r.num_tokens, self.block_size) for r in group) for group in groups]
            num_admissible = count_admissible(costs, self._admission_capacity())
        self.waiting.clear()
        for group in groups[:num_admissible]:
            self.waiting.extend(group)
        return [request for group in groups[num_admissible:] + orphans for request in group]

    def _is_orphan(self, group: list[Request]) -> bool:
        """True for a lone waiting member of a pair (whose partner is not waiting); marks the pair."""
        pair = self.pairs.get(group[0].request_id)
        if pair is None or len(group) == 2:
            return False
        if not pair.error:
            pair.error = f"sequence {group[0].request_id} is waiting without its partner"
        return True

    def _admission_capacity(self) -> Capacity:
        running_tokens = sum(
            max(0, r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens) for r in self.running
        )
        running_blocks = sum(self._decode_block_need(r) for r in self.running)
        return Capacity(
            num_tokens=self.max_num_scheduled_tokens - running_tokens,
            num_free_blocks=self.kv_cache_manager.block_pool.get_num_free_blocks() - running_blocks,
            num_seq_slots=self.max_num_active_reqs - len(self.running) - self.num_waiting_for_streaming_input,
            watermark_blocks=self.kv_cache_manager.watermark_blocks,
        )

    def _check_scheduled_together(self, output: SchedulerOutput) -> None:
        scheduled = output.num_scheduled_tokens
        for pair in self.pairs.pairs():
            if (pair.cond_id in scheduled) != (pair.twin_id in scheduled) and not pair.error:
                pair.error = f"only one sequence of the pair was scheduled in step {self.current_step}"

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        """vLLM's bookkeeping of a step, then the pair checks; twins' outputs are dropped."""
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        scheduled = scheduler_output.num_scheduled_tokens
        for pair in list(self.pairs.pairs()):
            if not pair.error and (pair.cond_id in scheduled or pair.twin_id in scheduled):
                cond_tokens, twin_tokens = pair.cond.output_token_ids, pair.twin.output_token_ids
                pair.error = describe_misalignment(cond_tokens, twin_tokens, pair.num_checked)
                pair.num_checked = len(cond_tokens)
            self._settle(pair, outputs)
        _drop_twin_outputs(outputs)
        return outputs

    def _settle(self, pair: PairLink, outputs: dict[int, EngineCoreOutputs]) -> None:
        """Fail a broken pair, or finish the sequence whose partner finished."""
        cond, twin = pair.cond, pair.twin
        if pair.error:
            self._fail_pair(pair, outputs)
        elif cond.is_finished() and not twin.is_finished():
            super().finish_requests(twin.request_id, cond.status)
        elif twin.is_finished() and not cond.is_finished():
            super().finish_requests(cond.request_id, twin.status)
            _set_finish_reason(outputs, cond, cond.get_finished_reason(), cond.stop_reason)
        if cond.is_finished() and twin.is_finished():
            self.pairs.unlink(pair)

    def _fail_pair(self, pair: PairLink, outputs: dict[int, EngineCoreOutputs]) -> None:
        """End both sequences; the request's final output (even one sent this step) becomes an error."""
        pair.cond.stop_reason = PAIR_ERROR_PREFIX + pair.error
        super().finish_requests([pair.cond_id, pair.twin_id], RequestStatus.FINISHED_ERROR)
        _set_finish_reason(outputs, pair.cond, FinishReason.ERROR, pair.cond.stop_reason)


def _set_finish_reason(
    outputs: dict[int, EngineCoreOutputs], request: Request, reason: FinishReason | None, stop_reason: Any
) -> None:
    """Mark ``request``'s output of this step as final (adding an empty one if it has none)."""
    client_outputs = outputs.get(request.client_index)
    if client_outputs is None:
        client_outputs = outputs[request.client_index] = EngineCoreOutputs(outputs=[])
    for output in client_outputs.outputs:
        if output.request_id == request.request_id:
            output.finish_reason = reason
            output.stop_reason = stop_reason
            return
    client_outputs.outputs.append(
        EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[],
            finish_reason=reason,
            stop_reason=stop_reason,
            events=request.take_events(),
        )
    )


def _drop_twin_outputs(outputs: dict[int, EngineCoreOutputs]) -> None:
    """The frontend never knew the twins: drop their outputs and finished ids."""
    for client_outputs in outputs.values():
        client_outputs.outputs = [o for o in client_outputs.outputs if not o.request_id.endswith(UNCOND_SUFFIX)]
        if client_outputs.finished_requests:
            client_outputs.finished_requests = {
                r for r in client_outputs.finished_requests if not r.endswith(UNCOND_SUFFIX)
            }
