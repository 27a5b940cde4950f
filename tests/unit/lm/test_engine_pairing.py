"""Guided-pair bookkeeping of the LM engine's scheduler (pure Python, no vLLM)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lm_service.engine.pairing import (
    AdmissionCost,
    Capacity,
    PairRegistry,
    count_admissible,
    describe_misalignment,
    group_cost,
    group_waiting,
    sequence_cost,
)
from lm_service.engine.wire import RowArgs, RowRole, read_row_args, twin_request_id
from lm_service.engine.types import ConstraintRef, SamplingSettings


@dataclass
class Seq:
    request_id: str
    output_token_ids: list[int] = field(default_factory=list)


def _registry(*names: str) -> tuple[PairRegistry, dict[str, Seq]]:
    registry, seqs = PairRegistry(), {}
    for name in names:
        cond, twin = Seq(name), Seq(twin_request_id(name))
        registry.link(cond, twin)
        seqs[cond.request_id], seqs[twin.request_id] = cond, twin
    return registry, seqs


def test_registry_links_partners_both_ways_and_unlinks() -> None:
    registry, seqs = _registry("a", "b")
    assert registry.partner_id("a") == "a#uncond" and registry.partner_id("a#uncond") == "a"
    assert registry.is_twin("a#uncond") and not registry.is_twin("a")
    assert registry.partner_id("single") is None
    assert len(registry) == 2
    registry.unlink(registry.get("a"))
    assert registry.get("a") is None and registry.get("a#uncond") is None and len(registry) == 1
    with pytest.raises(ValueError):
        registry.link(seqs["b"], Seq("other"))


def test_with_partners_expands_aborts_to_both_sequences() -> None:
    registry, _ = _registry("a", "b")
    assert registry.with_partners(["a", "x", "b#uncond"]) == ["a", "a#uncond", "x", "b#uncond", "b"]


def test_misalignment_names_the_difference() -> None:
    assert describe_misalignment([1, 2, 3], [1, 2, 3]) == ""
    assert "lengths differ" in describe_misalignment([1, 2, 3], [1, 2])
    assert "step 1" in describe_misalignment([1, 2, 3], [1, 9, 3])
    assert "step 2" in describe_misalignment((1, 2, 3), (1, 2, 4), start=1)
    assert describe_misalignment((9, 2, 3), (1, 2, 3), start=1) == ""  # tokens before start were checked


def test_group_waiting_pulls_a_pair_together_in_queue_order() -> None:
    registry, seqs = _registry("a", "b")
    single = Seq("s")
    queue = [seqs["a"], single, seqs["b"], seqs["a#uncond"], seqs["b#uncond"]]
    groups = group_waiting(queue, registry)
    assert [[s.request_id for s in g] for g in groups] == [["a", "a#uncond"], ["s"], ["b", "b#uncond"]]


def test_group_waiting_leaves_an_orphan_alone() -> None:
    registry, seqs = _registry("a")
    groups = group_waiting([seqs["a#uncond"]], registry)
    assert [[s.request_id for s in g] for g in groups] == [["a#uncond"]]


def test_sequence_cost_rounds_blocks_up() -> None:
    assert sequence_cost(128, 128) == AdmissionCost(num_tokens=128, num_blocks=1, num_seqs=1)
    assert sequence_cost(129, 128).num_blocks == 2
    assert group_cost([sequence_cost(100, 64), sequence_cost(10, 64)]) == AdmissionCost(110, 3, 2)


def test_count_admissible_stops_at_the_first_group_that_does_not_fit_whole() -> None:
    pair = AdmissionCost(num_tokens=200, num_blocks=4, num_seqs=2)
    single = AdmissionCost(num_tokens=10, num_blocks=1, num_seqs=1)
    capacity = Capacity(num_tokens=1000, num_free_blocks=9, num_seq_slots=10, watermark_blocks=0)
    assert count_admissible([pair, pair, single], capacity) == 3
    assert count_admissible([pair, pair, pair, single], capacity) == 2  # FCFS: the single may not overtake
    tight = Capacity(num_tokens=1000, num_free_blocks=7, num_seq_slots=10)
    assert count_admissible([pair, pair], tight) == 1
    slots = Capacity(num_tokens=1000, num_free_blocks=100, num_seq_slots=3)
    assert count_admissible([pair, pair], slots) == 1  # the second pair would have only one slot
    tokens = Capacity(num_tokens=399, num_free_blocks=100, num_seq_slots=10)
    assert count_admissible([pair, pair], tokens) == 1
    watermark = Capacity(num_tokens=1000, num_free_blocks=8, num_seq_slots=10, watermark_blocks=1)
    assert count_admissible([pair, pair], watermark) == 1
    assert count_admissible([], capacity) == 0


def test_row_args_survive_the_extra_args_round_trip() -> None:
    settings = SamplingSettings(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.1, cfg_scale=2.5,
                                seed=42, stop_token_ids=(7, 8))
    ref = ConstraintRef(builder="pkg.mod:build", spec={"phase": "codes", "n": 3}, vocab_loader="pkg.mod:vocab")
    args = RowArgs(key="k", role=RowRole.COND, settings=settings, constraint=ref, uncond_prompt_token_ids=(1, 2))
    back = read_row_args(args.to_extra_args())
    assert back == args
    twin = back.twin()
    assert twin.role is RowRole.UNCOND and twin.key == "k" and twin.uncond_prompt_token_ids is None
    assert read_row_args(None) is None and read_row_args({"other": 1}) is None
    with pytest.raises(ValueError):
        twin.twin()
