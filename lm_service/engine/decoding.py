"""Per-request decoding state and one batched pass that picks every request's token (both backends).

``GuidedDecoder`` holds one request's settings, prompt and constraint. ``decode_step`` takes a
step's logits ``[B, W]`` and the rows of any number of requests (a guided request's conditional and
unconditional rows, an unguided one's single row) and runs the ``sampling`` pipeline for all of
them at once: CFG, constraint masks, repetition penalty, filters and seeded sampling.

A request whose constraint declares its allowed tokens as a window (``allowed_window()``, e.g. the
audio codes and EOS) is decided in that window: its columns are gathered (or the caller computed
only those columns of the output projection and passes them as ``columns``), masked with the
window's ``blocked`` flags, and sampled there. Other constrained requests mask their full row with
``mask_logits``. Rows that share a window (or use full rows) are processed together.

The decoder holds no step counter: the step is ``len(output_token_ids)``, the constraint is caught
up with the tokens it has not seen yet, and the random number of a step depends only on
``(seed, step)``. So a decoder that is dropped and rebuilt (vLLM drops a request from its batch
when it is preempted) continues exactly where the old one was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lm_service.engine.constraint_hook import TokenConstraint, TokenWindow, allowed_window
from lm_service.engine.sampling import (
    apply_repetition_penalty,
    cfg_combine,
    has_allowed_token,
    pick_tokens,
    step_uniform,
)
from lm_service.engine.types import SamplingSettings

ConstraintFactory = Callable[[], TokenConstraint]
_MAX_SLICES = 8  # a window of more runs of consecutive ids is gathered by index instead


@dataclass(frozen=True)
class StepPlan:
    """What a request needs this step: a stop token (the constraint ended the output, no logits
    needed), or its constraint and, where it declares one, the window of its allowed tokens."""

    stop_token: int | None = None
    constraint: TokenConstraint | None = None
    window: TokenWindow | None = None


class GuidedDecoder:
    """One request's decoding state.

    Args:
        settings: sampling settings (with the resolved seed).
        prompt_token_ids: the conditional prompt (the repetition penalty also covers it).
        constraint_factory: builds the request's constraint in its initial state; None: no constraint.
    """

    def __init__(
        self,
        settings: SamplingSettings,
        prompt_token_ids: Sequence[int],
        constraint_factory: ConstraintFactory | None = None,
    ) -> None:
        self.settings = settings
        self._prompt_token_ids = list(prompt_token_ids)
        self._constraint_factory = constraint_factory
        self._constraint: TokenConstraint | None = None
        self._num_advanced = 0
        self._seen: dict[int, None] = {}      # prompt + output ids, first occurrence order
        self._num_seen_outputs = -1           # outputs in _seen; -1: not built yet
        self._seen_ids: torch.Tensor | None = None

    @property
    def uses_guidance(self) -> bool:
        return self.settings.cfg_scale > 1.0

    def plan(self, output_token_ids: Sequence[int]) -> StepPlan:
        """Catch the constraint up with ``output_token_ids`` and say what this step needs."""
        constraint = self._synced_constraint(output_token_ids)
        if constraint is None:
            return StepPlan()
        if constraint.is_finished:
            return StepPlan(stop_token=self.stop_token())
        return StepPlan(constraint=constraint, window=allowed_window(constraint))

    def uniform(self, output_token_ids: Sequence[int]) -> float:
        """This step's random number (0 for greedy settings, which ignore it)."""
        return 0.0 if self.settings.is_greedy else step_uniform(self.settings.seed, len(output_token_ids))

    def penalized_ids(self, output_token_ids: Sequence[int]) -> torch.Tensor:
        """``[N]`` int64: the distinct ids of the prompt and ``output_token_ids`` (kept incrementally)."""
        if self._num_seen_outputs < 0 or self._num_seen_outputs > len(output_token_ids):
            self._seen = dict.fromkeys(self._prompt_token_ids)
            self._num_seen_outputs, self._seen_ids = 0, None
        size = len(self._seen)
        self._seen.update(dict.fromkeys(int(t) for t in output_token_ids[self._num_seen_outputs:]))
        self._num_seen_outputs = len(output_token_ids)
        if self._seen_ids is None or len(self._seen) != size:
            self._seen_ids = torch.tensor(list(self._seen), dtype=torch.long)
        return self._seen_ids

    def next_token(
        self,
        cond_logits: torch.Tensor,
        uncond_logits: torch.Tensor | None,
        output_token_ids: Sequence[int],
    ) -> int:
        """The token for step ``len(output_token_ids)`` of this request alone.

        Args:
            cond_logits: ``[V]`` raw logits of the conditional stream.
            uncond_logits: ``[V]`` raw logits of the unconditional stream; required when guided.
            output_token_ids: every token generated so far (identical in both streams).
        """
        if self.uses_guidance and uncond_logits is None:
            raise ValueError("a guided request needs the unconditional logits")
        rows = [cond_logits] if uncond_logits is None else [cond_logits, uncond_logits]
        logits = torch.stack(rows)  # [1 or 2, V]
        row = DecodeRow(self, output_token_ids, 0, 1 if self.uses_guidance else None)
        return decided(decode_step(logits, [row])[0])

    def _synced_constraint(self, output_token_ids: Sequence[int]) -> TokenConstraint | None:
        """The constraint, advanced over every generated token it has not seen yet."""
        if self._constraint_factory is None:
            return None
        if self._constraint is None or self._num_advanced > len(output_token_ids):
            self._constraint = self._constraint_factory()
            self._num_advanced = 0
        for token_id in output_token_ids[self._num_advanced:]:
            self._constraint.advance(int(token_id))
        self._num_advanced = len(output_token_ids)
        return self._constraint

    def stop_token(self) -> int:
        if not self.settings.stop_token_ids:
            raise ValueError("the constraint ended the output but the request has no stop token")
        return self.settings.stop_token_ids[0]


@dataclass(frozen=True)
class DecodeRow:
    """One request in a step: its decoder, its tokens so far, and its row(s) of the logits."""

    decoder: GuidedDecoder
    output_token_ids: Sequence[int]
    cond_row: int
    uncond_row: int | None = None  # required when the decoder uses guidance


StepResult = int | Exception  # the token, or why this request's token could not be picked


def decided(result: StepResult) -> int:
    """The token of a ``decode_step`` result; raises the request's error."""
    if isinstance(result, Exception):
        raise result
    return result


def decode_step(logits: torch.Tensor, rows: Sequence[DecodeRow], columns: torch.Tensor | None = None) -> list[StepResult]:
    """Every request's token for this step, in the order of ``rows``.

    Args:
        logits: ``[B, W]`` raw logits; each request reads its own rows.
        rows: the requests (their rows must not overlap).
        columns: None when column ``j`` is token ``j``; else ``[W]`` the ids of the columns, which
            must be the window every request declares this step (a head computed for it only).

    A request whose constraint fails gets its exception as its result; the others are unaffected.
    """
    results: list[StepResult | None] = [None] * len(rows)
    groups: dict[int | None, list[tuple[int, StepPlan]]] = {}
    for index, row in enumerate(rows):
        try:
            plan = _checked_plan(row, columns)
        except Exception as exc:  # a constraint's own failure ends only its request
            results[index] = exc
            continue
        if plan.stop_token is not None:
            results[index] = plan.stop_token
        else:
            groups.setdefault(None if plan.window is None else id(plan.window.ids), []).append((index, plan))
    for members in groups.values():
        tokens = _decide_group(logits, [rows[i] for i, _ in members], [plan for _, plan in members], columns)
        for (index, _), token in zip(members, tokens):
            results[index] = token
    return results  # type: ignore[return-value]


def _checked_plan(row: DecodeRow, columns: torch.Tensor | None) -> StepPlan:
    if row.decoder.uses_guidance and row.uncond_row is None:
        raise ValueError("a guided request needs the unconditional logits")
    plan = row.decoder.plan(row.output_token_ids)
    if columns is not None and plan.stop_token is None and (plan.window is None or plan.window.ids is not columns):
        raise ValueError("logits computed for a window need a constraint that declares that window")
    return plan


def _decide_group(
    logits: torch.Tensor, rows: list[DecodeRow], plans: list[StepPlan], columns: torch.Tensor | None
) -> list[StepResult]:
    """Decide requests that share a window (or all use full rows) in one batched pass."""
    window = plans[0].window
    token_ids = None if window is None else _on(window.ids, logits.device)  # [K] column -> token id
    gather = token_ids if columns is None else None
    combined = _guided_logits(logits, rows, gather)  # [R, W]
    failed: dict[int, StepResult] = {}
    if window is None:
        failed.update(_mask_rows(combined, plans))
    else:
        _mask_window(combined, plans)
    allowed = has_allowed_token(combined).tolist()
    for index, is_allowed in enumerate(allowed):
        if not is_allowed and index not in failed:
            failed[index] = _stop_or_error(rows[index].decoder)
    if failed:
        combined[list(failed)] = 0.0  # keeps the batched filters finite; results replaced below
    combined = _penalized(combined, rows, token_ids)
    settings = [row.decoder.settings for row in rows]
    picked = pick_tokens(combined, [s.temperature for s in settings], [s.top_k for s in settings],
                         [s.top_p for s in settings], [r.decoder.uniform(r.output_token_ids) for r in rows])  # [R]
    if token_ids is not None:
        picked = token_ids[picked]
    tokens: list[StepResult] = [int(t) for t in picked.tolist()]
    for index, result in failed.items():
        tokens[index] = result
    return tokens


def _guided_logits(logits: torch.Tensor, rows: list[DecodeRow], gather: torch.Tensor | None) -> torch.Tensor:
    """``[R, W]`` float32: the conditional rows, combined with their unconditional rows where guided."""
    device = logits.device
    cond = _rows_of(logits, [row.cond_row for row in rows], gather).to(torch.float32)  # [R, W]
    guided = [i for i, row in enumerate(rows) if row.decoder.uses_guidance]
    if not guided:
        return cond
    uncond = _rows_of(logits, [rows[i].uncond_row for i in guided], gather)  # [G, W]
    scale = torch.tensor([rows[i].decoder.settings.cfg_scale for i in guided], device=device)  # [G]
    if len(guided) == len(rows):
        return cfg_combine(cond, uncond, scale)  # [R, W]
    which = torch.tensor(guided, dtype=torch.long, device=device)  # [G]
    return cond.index_copy_(0, which, cfg_combine(cond.index_select(0, which), uncond, scale))


def _rows_of(logits: torch.Tensor, indices: list[int], gather: torch.Tensor | None) -> torch.Tensor:
    """``[N, W]`` rows ``indices`` of ``logits``, restricted to the columns ``gather`` (ids) if given."""
    rows = logits.index_select(0, torch.tensor(indices, dtype=torch.long, device=logits.device))  # [N, V]
    if gather is None:
        return rows
    if len(_runs(gather)) > _MAX_SLICES:
        return rows.index_select(1, gather)  # [N, K]
    return torch.cat([rows[:, low:high] for low, high in _runs(gather)], dim=1)  # [N, K]


_runs_cache: dict[int, tuple[torch.Tensor, list[tuple[int, int]]]] = {}


def _runs(ids: torch.Tensor) -> list[tuple[int, int]]:
    """The ``[low, high)`` runs of consecutive ids in ``ids`` (ascending), cached per tensor (the
    entry keeps it alive, so its id is not reused)."""
    cached = _runs_cache.get(id(ids))
    if cached is None or cached[0] is not ids:
        values = ids.tolist()
        starts = [0] + [i for i in range(1, len(values)) if values[i] != values[i - 1] + 1]
        ends = starts[1:] + [len(values)]
        cached = _runs_cache[id(ids)] = (ids, [(values[a], values[b - 1] + 1) for a, b in zip(starts, ends)])
    return cached[1]


def _mask_rows(combined: torch.Tensor, plans: list[StepPlan]) -> dict[int, StepResult]:
    """Each constraint masks its full row in place; a constraint that raises fails its request."""
    failed: dict[int, StepResult] = {}
    for index, plan in enumerate(plans):
        if plan.constraint is None:
            continue
        row = combined[index]  # [V] view
        try:
            masked = plan.constraint.mask_logits(row)
        except Exception as exc:  # a constraint's own failure ends only its request
            failed[index] = exc
            continue
        if masked is not row:
            row.copy_(masked)
    return failed


def _mask_window(combined: torch.Tensor, plans: list[StepPlan]) -> None:
    """Block, in place, the window ids each request's constraint disallows this step."""
    blocked = [plan.window.blocked for plan in plans]
    if all(b is None for b in blocked):
        return
    if all(b is blocked[0] for b in blocked):  # the usual case: every row at the same kind of step
        combined.masked_fill_(_on(blocked[0], combined.device), float("-inf"))  # [K] broadcast
        return
    none = torch.zeros(combined.shape[-1], dtype=torch.bool)  # [K]
    mask = torch.stack([none if b is None else b for b in blocked]).to(combined.device)  # [R, K]
    combined.masked_fill_(mask, float("-inf"))


def _penalized(combined: torch.Tensor, rows: list[DecodeRow], token_ids: torch.Tensor | None) -> torch.Tensor:
    """The repetition penalty of every row whose penalty is not 1, in one scatter."""
    row_parts, column_parts, penalties = [], [], []
    for index, row in enumerate(rows):
        penalty = row.decoder.settings.repetition_penalty
        penalties.append(penalty)
        if penalty == 1.0:
            continue
        columns = _columns_of(row.decoder.penalized_ids(row.output_token_ids).to(combined.device), token_ids,
                              combined.shape[-1])  # [N]
        column_parts.append(columns)
        row_parts.append(torch.full_like(columns, index))
    if not column_parts:
        return combined
    penalty = torch.tensor(penalties, device=combined.device)  # [R]
    return apply_repetition_penalty(combined, torch.cat(row_parts), torch.cat(column_parts), penalty)


def _columns_of(ids: torch.Tensor, token_ids: torch.Tensor | None, width: int) -> torch.Tensor:
    """The columns holding ``ids`` (ids without a column dropped)."""
    if token_ids is None:
        return ids[ids < width]
    position = torch.searchsorted(token_ids, ids).clamp(max=token_ids.numel() - 1)  # [N]
    return position[token_ids[position] == ids]


def _stop_or_error(decoder: GuidedDecoder) -> StepResult:
    try:
        return decoder.stop_token()
    except ValueError as exc:
        return exc


_device_copies: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (a long-lived window) on ``device``, copied once (the entry keeps the original
    alive, so its id is never reused for another tensor)."""
    if tensor.device == device:
        return tensor
    key = (id(tensor), device)
    if key not in _device_copies:
        _device_copies[key] = (tensor, tensor.to(device))
    return _device_copies[key][1]
