"""Bookkeeping that keeps the two sequences of a guided request together (no vLLM imports).

The scheduler (``scheduler.py``) owns a ``PairRegistry`` and uses the pure helpers here to:

* group a waiting queue so that a pair's sequences sit next to each other (``group_waiting``);
* decide how many waiting groups can be admitted in one step so that a pair is admitted whole or
  not at all (``count_admissible``, with conservative per-sequence costs);
* check after every step that both sequences produced the same tokens (``describe_misalignment``).

Requests are duck-typed: anything with ``request_id`` and ``output_token_ids``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PairLink:
    """The conditional sequence of a request and its unconditional twin."""

    cond: Any
    twin: Any
    error: str = ""          # set once the pair is found broken; the request then fails
    num_checked: int = 0     # generated tokens already found identical in both streams

    @property
    def cond_id(self) -> str:
        return self.cond.request_id

    @property
    def twin_id(self) -> str:
        return self.twin.request_id


@dataclass
class PairRegistry:
    """Which engine sequences form guided pairs (by request id)."""

    _by_id: dict[str, PairLink] = field(default_factory=dict)

    def link(self, cond: Any, twin: Any) -> PairLink:
        if cond.request_id in self._by_id or twin.request_id in self._by_id:
            raise ValueError(f"request {cond.request_id!r} is already paired")
        pair = PairLink(cond=cond, twin=twin)
        self._by_id[cond.request_id] = pair
        self._by_id[twin.request_id] = pair
        return pair

    def unlink(self, pair: PairLink) -> None:
        self._by_id.pop(pair.cond_id, None)
        self._by_id.pop(pair.twin_id, None)

    def get(self, request_id: str) -> PairLink | None:
        return self._by_id.get(request_id)

    def partner_id(self, request_id: str) -> str | None:
        pair = self._by_id.get(request_id)
        if pair is None:
            return None
        return pair.twin_id if request_id == pair.cond_id else pair.cond_id

    def is_twin(self, request_id: str) -> bool:
        pair = self._by_id.get(request_id)
        return pair is not None and pair.twin_id == request_id

    def with_partners(self, request_ids: Iterable[str]) -> list[str]:
        """``request_ids`` plus the partner of every paired one, without duplicates, in order."""
        out: dict[str, None] = {}
        for request_id in request_ids:
            out[request_id] = None
            partner = self.partner_id(request_id)
            if partner is not None:
                out[partner] = None
        return list(out)

    def pairs(self) -> Iterator[PairLink]:
        seen: set[str] = set()
        for pair in self._by_id.values():
            if pair.cond_id not in seen:
                seen.add(pair.cond_id)
                yield pair

    def __len__(self) -> int:
        return len(self._by_id) // 2


def describe_misalignment(cond_tokens: Sequence[int], twin_tokens: Sequence[int], start: int = 0) -> str:
    """Empty when both streams generated the same tokens, else what differs.

    Tokens before ``start`` are taken as already checked (the scheduler checks each step's new
    tokens only).
    """
    if len(cond_tokens) != len(twin_tokens):
        return f"generated lengths differ: conditional {len(cond_tokens)}, unconditional {len(twin_tokens)}"
    if isinstance(cond_tokens, list) and isinstance(twin_tokens, list) and cond_tokens == twin_tokens:
        return ""
    for step in range(start, len(cond_tokens)):
        if cond_tokens[step] != twin_tokens[step]:
            return f"generated tokens differ at step {step}: {cond_tokens[step]} vs {twin_tokens[step]}"
    return ""


def group_waiting(waiting: Sequence[Any], registry: PairRegistry) -> list[list[Any]]:
    """Waiting sequences in queue order, each pair as one group ``[cond, twin]``.

    A pair whose members are apart is pulled together at the position of its first member. A
    paired sequence whose partner is not waiting forms a group of one (the caller treats it as a
    broken pair).
    """
    by_id = {request.request_id: request for request in waiting}
    placed: set[str] = set()
    groups: list[list[Any]] = []
    for request in waiting:
        if request.request_id in placed:
            continue
        pair = registry.get(request.request_id)
        members = [request]
        if pair is not None and pair.cond_id in by_id and pair.twin_id in by_id:
            members = [by_id[pair.cond_id], by_id[pair.twin_id]]
        placed.update(member.request_id for member in members)
        groups.append(members)
    return groups


@dataclass(frozen=True)
class AdmissionCost:
    """Upper bounds of what admitting one group takes in a step."""

    num_tokens: int
    num_blocks: int
    num_seqs: int


@dataclass(frozen=True)
class Capacity:
    """What a step has left for admissions after the running sequences took theirs."""

    num_tokens: int
    num_free_blocks: int
    num_seq_slots: int
    watermark_blocks: int = 0


def sequence_cost(num_tokens: int, block_size: int) -> AdmissionCost:
    """Prefilling ``num_tokens`` (prompt plus any output being recomputed) from scratch."""
    return AdmissionCost(num_tokens=num_tokens, num_blocks=-(-num_tokens // block_size), num_seqs=1)


def group_cost(costs: Iterable[AdmissionCost]) -> AdmissionCost:
    costs = list(costs)
    return AdmissionCost(
        num_tokens=sum(c.num_tokens for c in costs),
        num_blocks=sum(c.num_blocks for c in costs),
        num_seqs=sum(c.num_seqs for c in costs),
    )


def count_admissible(costs: Sequence[AdmissionCost], capacity: Capacity) -> int:
    """How many leading groups fit together (first come, first served: stop at the first misfit).

    Costs ignore prefix-cache hits, so they bound what vLLM's scheduler will take and every group
    counted here is admitted whole by it.
    """
    tokens, blocks, seqs = capacity.num_tokens, capacity.num_free_blocks, capacity.num_seq_slots
    for index, cost in enumerate(costs):
        fits = (
            cost.num_tokens <= tokens
            and cost.num_seqs <= seqs
            and cost.num_blocks + capacity.watermark_blocks <= blocks
        )
        if not fits:
            return index
        tokens -= cost.num_tokens
        blocks -= cost.num_blocks
        seqs -= cost.num_seqs
    return len(costs)
