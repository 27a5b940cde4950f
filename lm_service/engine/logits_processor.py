"""vLLM v1 batch-level logits processor: guidance, constraints and sampling for tagged sequences.

Passed to vLLM as ``logits_processors=[GuidanceLogitsProcessor]``; it runs in the worker process.
vLLM samples every tagged sequence greedily (``temperature=0`` in its own ``SamplingParams``), and
this processor decides the tokens: it hands every tagged request's row(s) of the step to one
``decode_step`` call (CFG in float32, constraint masks, repetition penalty, top-k, top-p,
temperature and seeded sampling, batched across requests) and forces the rows to their tokens
(every other logit ``-inf``). A guided pair's two rows are forced to the same token. A request in
the audio-code phase is decided among the codes and EOS only (its constraint's window); vLLM still
computes the full output projection, since it has no per-request hook for a reduced head.

Rows are found through ``BatchUpdate``: each added row brings its ``SamplingParams`` (whose
``extra_args`` say request key and role), its prompt ids and a live reference to its output ids.
Before combining a pair the processor checks that both rows are present with identical generated
tokens; a pair that is not (which the scheduler prevents and reports as an error for the request)
is sampled per row without guidance instead of mixing two contexts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from lm_service.engine.constraint_hook import build_constraint
from lm_service.engine.decoding import ConstraintFactory, DecodeRow, GuidedDecoder, decode_step
from lm_service.engine.pairing import describe_misalignment
from lm_service.engine.sampling import force_tokens
from lm_service.engine.wire import RowArgs, RowRole, read_row_args

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    args: RowArgs
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # live reference into the worker's request state


@dataclass(frozen=True)
class _Request:
    """One decision of a step: the rows forced to its token, and what ``decode_step`` reads."""

    key: str
    targets: tuple[int, ...]
    row: DecodeRow


class GuidanceLogitsProcessor(LogitsProcessor):
    """Samples the next token of every sequence this engine tagged (see the module docstring)."""

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool) -> None:
        self._tokenizer_dir = str(vllm_config.model_config.tokenizer)
        self._rows: dict[int, _Row] = {}
        self._decoders: dict[str, GuidedDecoder] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``extra_args`` at submission, in the frontend process."""
        try:
            read_row_args(sampling_params.extra_args)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed LM engine extra_args: {exc}") from exc

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            args = read_row_args(params.extra_args) if params is not None else None
            if args is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = _Row(args, list(prompt_ids or ()), output_ids)
        for first, second, direction in batch_update.moved:
            row_first, row_second = self._rows.pop(first, None), self._rows.pop(second, None)
            if row_first is not None:
                self._rows[second] = row_first
            if direction == MoveDirectionality.SWAP and row_second is not None:
                self._rows[first] = row_second
        live_keys = {row.args.key for row in self._rows.values()}
        for key in [key for key in self._decoders if key not in live_keys]:
            del self._decoders[key]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Force every tagged row of ``logits`` ``[B, V]`` to its request's next token."""
        if not self._rows:
            return logits
        groups = self._group_rows()
        requests = [request for key, (cond_index, uncond_index) in groups.items()
                    for request in self._requests(key, cond_index, uncond_index)]
        try:
            results = decode_step(logits, [request.row for request in requests])
        except Exception as exc:  # a batched stage failed: every request of the step ends
            results = [exc] * len(requests)
        forced: dict[int, int] = {}
        failed: dict[str, Exception] = {}
        for request, result in zip(requests, results):
            if isinstance(result, Exception):
                failed.setdefault(request.key, result)
            else:
                forced.update(dict.fromkeys(request.targets, result))
        for key, error in failed.items():
            # one request's failing constraint must not stop the engine
            logger.error("LM request %s: picking its token failed; ending the request", key, exc_info=error)
            self._decoders.pop(key, None)
            forced.update(self._end_rows(*groups[key]))
        device = logits.device
        force_tokens(logits, torch.tensor(list(forced), dtype=torch.long, device=device),
                     torch.tensor(list(forced.values()), dtype=torch.long, device=device))
        return logits

    def _end_rows(self, cond_index: int | None, uncond_index: int | None) -> dict[int, int]:
        """Row -> token that ends a request whose token could not be picked.

        A pair's rows are forced to different tokens, which the scheduler reports as an error for
        the request; a single sequence is forced to its first stop token (the error is logged).
        """
        if cond_index is not None and uncond_index is not None:
            return {cond_index: 0, uncond_index: 1}
        ends = {}
        for index in (cond_index, uncond_index):
            if index is not None:
                stop_ids = self._rows[index].args.settings.stop_token_ids
                ends[index] = stop_ids[0] if stop_ids else 0
        return ends

    def _group_rows(self) -> dict[str, tuple[int | None, int | None]]:
        """request key -> (row of the conditional or single sequence, row of the twin)."""
        groups: dict[str, tuple[int | None, int | None]] = {}
        for index, row in self._rows.items():
            cond_index, uncond_index = groups.get(row.args.key, (None, None))
            if row.args.role is RowRole.UNCOND:
                uncond_index = index
            else:
                cond_index = index
            groups[row.args.key] = (cond_index, uncond_index)
        return groups

    def _requests(self, key: str, cond_index: int | None, uncond_index: int | None) -> list[_Request]:
        """What ``decode_step`` decides for one request: its pair, its single row, or (a broken
        pair) each present row on its own."""
        if cond_index is None:  # a twin without its conditional row: a broken pair
            return self._unguided(key, [uncond_index], "the conditional row is not in this step")
        cond_row = self._rows[cond_index]
        decoder = self._decoder(key, cond_row)
        if not decoder.uses_guidance:
            return [_Request(key, (cond_index,), DecodeRow(decoder, cond_row.output_token_ids, cond_index))]
        problem = self._pair_problem(cond_index, uncond_index)
        if problem:
            return self._unguided(key, [i for i in (cond_index, uncond_index) if i is not None], problem)
        row = DecodeRow(decoder, cond_row.output_token_ids, cond_index, uncond_index)
        return [_Request(key, (cond_index, uncond_index), row)]

    def _unguided(self, key: str, indices: list[int], problem: str) -> list[_Request]:
        logger.error("guided request %s: %s; sampling its rows without guidance", key, problem)
        requests = []
        for index in indices:
            row = self._rows[index]
            decoder = GuidedDecoder(replace(row.args.settings, cfg_scale=1.0), [], None)
            requests.append(_Request(key, (index,), DecodeRow(decoder, row.output_token_ids, index)))
        return requests

    def _pair_problem(self, cond_index: int | None, uncond_index: int | None) -> str:
        if cond_index is None or uncond_index is None:
            missing = "unconditional" if uncond_index is None else "conditional"
            return f"the {missing} row is not in this step"
        return describe_misalignment(self._rows[cond_index].output_token_ids, self._rows[uncond_index].output_token_ids)

    def _decoder(self, key: str, row: _Row) -> GuidedDecoder:
        decoder = self._decoders.get(key)
        if decoder is None:
            decoder = GuidedDecoder(row.args.settings, row.prompt_token_ids, self._constraint_factory(row))
            self._decoders[key] = decoder
        return decoder

    def _constraint_factory(self, row: _Row) -> ConstraintFactory | None:
        """Builds the request's constraint from the conditional row's spec and prompt."""
        ref = row.args.constraint
        if ref is None:
            return None
        prompt: Sequence[int] = row.prompt_token_ids
        return lambda: build_constraint(ref, prompt, self._tokenizer_dir)
