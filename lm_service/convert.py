"""Plan events and LM task messages ↔ protobufs (edge module)."""

from __future__ import annotations

from lm_service.plan import PlanCodes, PlanDone, PlanEvent, PlanInput, PlanMetadata, PlanProgress
from shared import convert
from shared.errors import InvalidArgument
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.lm.v1 import lm_pb2
from shared.validation import MAX_SEED, check_range, validate_params

_STAGES = {"lm_metadata": common_pb2.STAGE_LM_METADATA, "lm_codes": common_pb2.STAGE_LM_CODES}


def plan_input(request: lm_pb2.PlanRequest) -> PlanInput:
    params = convert.params_from_pb(request.params)
    validate_params(params, with_uploads=False)  # the gateway keeps the uploads to itself
    check_range("num_items", request.num_items, 1, 8)
    seeds = list(request.seeds)
    if len(seeds) > request.num_items:
        raise InvalidArgument(f"seeds must hold at most num_items ({request.num_items}) values, got {len(seeds)}",
                              field="seeds")
    for seed in seeds:
        check_range("seeds", seed, -1, MAX_SEED)
    seeds += [-1] * (request.num_items - len(seeds))
    return PlanInput(request.request_id, params, tuple(s if s >= 0 else None for s in seeds),
                     request.need_codes, request.constrained_decoding_debug or False)


def plan_event(event: PlanEvent) -> lm_pb2.PlanEvent:
    if isinstance(event, PlanProgress):
        fraction = min(event.current / event.total, 1.0) if event.total else 0.0
        message = f"{event.current} tokens" + (f" of {event.total}" if event.total else "")
        return lm_pb2.PlanEvent(progress=common_pb2.Progress(stage=_STAGES[event.stage], fraction=fraction,
                                                             current=event.current, total=event.total,
                                                             message=message))
    if isinstance(event, PlanMetadata):
        return lm_pb2.PlanEvent(metadata=lm_pb2.PlanMetadata(metadata=convert.metadata_to_pb(event.metadata),
                                                             cot_text=event.cot_text,
                                                             phase1_skipped=event.phase1_skipped))
    if isinstance(event, PlanCodes):
        return lm_pb2.PlanEvent(codes=lm_pb2.PlanCodes(item_index=event.item_index, codes=event.codes,
                                                       seed=event.seed))
    if isinstance(event, PlanDone):
        return lm_pb2.PlanEvent(done=lm_pb2.PlanDone(time_costs=common_pb2.TimeCosts(seconds=event.time_costs)))
    raise TypeError(f"unknown plan event {event!r}")
