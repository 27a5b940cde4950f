"""Retake, extend and edit at the gateway: a studio request resolved against its source item.

Edge module: it reads the job store's logged ``GenerateEvent``s. A source item is a finished item
of one of the caller's jobs; its ``item_finished`` event holds the parameters that made it (seed
and audio codes included) and the store holds its file. The LM never runs for these tasks.

* Retake re-runs the source item's own generation (its task, text, metadata, codes, sampler
  settings) with each item's noise a variance-preserving mix of the source item's noise and the
  retake seed's: ``cos(v*pi/2) * orig + sin(v*pi/2) * new`` (ACE-Step v1's retake), exactly the
  original at ``v = 0`` and exactly the retake seed's at ``v = 1``. A retake of a retake item
  mixes into that item's own mix, so the chain is followed back to the first generation.
* Extend and edit send the source item's file to the DiT as ``src_audio`` (or the upload), with
  the caption, lyrics and metadata the request leaves unset taken from the source item.

Jobs keep no uploads: a retake of an item that was made from an uploaded ``src_audio`` needs the
same upload again (and a reference audio, if one was used).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Optional

from gateway import planning
from gateway.jobs.store import JobStore
from shared import convert
from shared.errors import InvalidArgument, NotFound
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.dit.v1 import dit_pb2
from shared.pb.acestep.gateway.v1 import gateway_pb2 as gw
from shared.types import GenerationConfig, GenerationParams
from shared.validation import SOURCE_TASKS, STUDIO_TASK_TYPES

NoiseTerms = tuple[tuple[int, float], ...]
MAX_RETAKE_CHAIN = 8  # retakes of retakes followed back at most this far (the DiT takes 16 noise terms)
INHERITED_FIELDS = ("caption", "lyrics", "instrumental", "vocal_language", "bpm", "keyscale", "timesignature")


def retake_weights(variance: float) -> tuple[float, float]:
    """``(cos(v*pi/2), sin(v*pi/2))``, exactly ``(1, 0)`` at ``v = 0`` and ``(0, 1)`` at ``v = 1``."""
    if variance <= 0.0:
        return 1.0, 0.0
    if variance >= 1.0:
        return 0.0, 1.0
    angle = variance * math.pi / 2
    return math.cos(angle), math.sin(angle)


def retake_terms(base: NoiseTerms, seed: int, variance: float) -> NoiseTerms:
    """The noise terms of a retake of an item whose noise is ``base`` with the retake ``seed``.
    Equal seeds merge; zero weights are dropped (so ``v = 0`` gives ``base`` bit for bit)."""
    keep, new = retake_weights(variance)
    merged: dict[int, float] = {}
    for term_seed, weight in base:
        merged[term_seed] = merged.get(term_seed, 0.0) + weight * keep
    merged[seed] = merged.get(seed, 0.0) + new
    return tuple((term_seed, weight) for term_seed, weight in merged.items() if weight != 0.0)


@dataclass(frozen=True)
class SourceItem:
    """A finished item of a job: the parameters that made it, its file, and its job's first seed
    (the seed the DiT sampled that job's VAE encoding with)."""

    params: GenerationParams
    audio: bytes
    first_seed: int


class JobSources:
    """Finished items of the job store, as sources of studio requests."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    async def check_owner(self, params: common_pb2.GenerationParams, caller: str) -> None:
        """The named source job must be the caller's (jobs are private to their API key)."""
        request_id = params.source_request_id
        if not request_id:
            return
        record = await self.store.get(request_id)
        if record is None or record.caller != caller:
            raise NotFound(f"no job {request_id!r} of yours (source_request_id)", field="source_request_id")

    async def item(self, request_id: str, item_index: int) -> SourceItem:
        """Item ``item_index`` of job ``request_id``; NotFound when it does not exist or never finished."""
        if await self.store.get(request_id) is None:
            raise NotFound(f"no job {request_id!r} (it may have passed its retention)", field="source_request_id")
        finished = {}
        for _, body in await self.store.events(request_id, 0):
            event = gw.GenerateEvent.FromString(body)
            if event.WhichOneof("event") == "item_finished":
                finished[event.item_finished.item_index] = event.item_finished
        found = await self.store.read_file(request_id, item_index)
        if item_index not in finished or found is None:
            raise NotFound(f"job {request_id!r} has no finished item {item_index}", field="source_item_index")
        item = finished[item_index]
        first_seed = finished[0].seed if 0 in finished else item.seed
        return SourceItem(params=convert.params_from_pb(item.params), audio=found[1], first_seed=first_seed)


@dataclass(frozen=True)
class StudioPlan:
    """A resolved studio request: what the DiT runs and what each item reports.

    ``dit_params`` excludes uploads; ``src_audio`` is the source file (None: the request's upload).
    """

    params: GenerationParams              # the request as resolved (reported in the result)
    dit_params: GenerationParams
    items: tuple[tuple[int, NoiseTerms], ...]   # (seed, noise terms) per item; () terms: the seed alone
    item_params: tuple[GenerationParams, ...]
    src_audio: Optional[bytes] = None
    vae_seed: Optional[int] = None

    def synthesize_request(self, request_id: str, request: gw.GenerateRequest) -> dit_pb2.SynthesizeRequest:
        """The DiT call: the plan's params with the source file, or the request's uploads."""
        params = convert.params_to_pb(dataclasses.replace(self.dit_params, src_audio=None, reference_audio=None))
        if self.src_audio is not None:
            params.src_audio.data = self.src_audio
        elif request.params.HasField("src_audio"):
            params.src_audio.CopyFrom(request.params.src_audio)
        if request.params.HasField("reference_audio"):
            params.reference_audio.CopyFrom(request.params.reference_audio)
        items = [dit_pb2.SynthesisItem(seed=seed, noise_mix=[dit_pb2.NoiseTerm(seed=s, weight=w) for s, w in terms])
                 for seed, terms in self.items]
        message = dit_pb2.SynthesizeRequest(
            request_id=request_id, params=params, items=items, stream_pcm=request.stream_pcm,
            audio_format=request.config.audio_format or common_pb2.AUDIO_FORMAT_FLAC)
        if self.vae_seed is not None:
            message.vae_seed = self.vae_seed
        return message


async def resolve(params: GenerationParams, config: GenerationConfig, sources: Optional[JobSources],
                  has_src_upload: bool) -> StudioPlan:
    """The plan of a validated retake / extend / edit request (``params.task_type`` one of them)."""
    if params.task_type not in STUDIO_TASK_TYPES:
        raise InvalidArgument(f"task_type {params.task_type!r} is not a studio operation", field="task_type")
    if params.source_request_id and sources is None:
        raise InvalidArgument("this gateway has no job store to read source items from", field="source_request_id")
    if params.task_type == "retake":
        return await _resolve_retake(params, config, sources, has_src_upload)
    src_audio = None
    if params.source_request_id:
        source = await sources.item(params.source_request_id, params.source_item_index)
        params, src_audio = _inherit_text(params, source.params), source.audio
    seeds = planning.resolve_seeds(params, config)
    return StudioPlan(params=params, dit_params=params, items=tuple((seed, ()) for seed in seeds),
                      item_params=tuple(dataclasses.replace(params, seed=seed) for seed in seeds), src_audio=src_audio)


def _inherit_text(params: GenerationParams, source: GenerationParams) -> GenerationParams:
    """Caption, lyrics and metadata the request leaves at their defaults come from the source item."""
    defaults = GenerationParams()
    inherited = {name: getattr(source, name) for name in INHERITED_FIELDS
                 if getattr(params, name) == getattr(defaults, name)}
    return dataclasses.replace(params, **inherited)


@dataclass(frozen=True)
class _Replay:
    """How to make an item again: its generation's parameters, noise terms and source file."""

    params: GenerationParams
    terms: NoiseTerms
    src_audio: Optional[bytes]
    vae_seed: int


async def _replay(source: SourceItem, sources: JobSources, depth: int) -> _Replay:
    params = source.params
    if params.task_type == "retake":
        if depth >= MAX_RETAKE_CHAIN:
            raise InvalidArgument(f"the retake chain behind this item is longer than {MAX_RETAKE_CHAIN} retakes; "
                                  "extend or edit it first to start a new chain", field="source_request_id")
        earlier = await sources.item(params.source_request_id, params.source_item_index)
        base = await _replay(earlier, sources, depth + 1)
        seed = params.retake_seeds[0] if params.retake_seeds else params.seed
        return dataclasses.replace(base, terms=retake_terms(base.terms, seed, params.retake_variance))
    src_audio = None
    if params.task_type in ("extend", "edit") and params.source_request_id:
        src_audio = (await sources.item(params.source_request_id, params.source_item_index)).audio
    return _Replay(params=params, terms=((params.seed, 1.0),), src_audio=src_audio, vae_seed=source.first_seed)


def _needs_upload(params: GenerationParams) -> bool:
    """Whether the item's generation read an uploaded src_audio (jobs do not keep uploads)."""
    if params.task_type in ("extend", "edit"):
        return not params.source_request_id
    return params.task_type in SOURCE_TASKS and not (params.task_type == "cover" and params.audio_codes.strip())


async def _resolve_retake(params: GenerationParams, config: GenerationConfig, sources: JobSources,
                          has_src_upload: bool) -> StudioPlan:
    source = await sources.item(params.source_request_id, params.source_item_index)
    base = await _replay(source, sources, 0)
    if base.src_audio is None and _needs_upload(base.params) and not has_src_upload:
        raise InvalidArgument(f"the source item was made by task_type {base.params.task_type!r} from an uploaded "
                              "src_audio, which jobs do not keep: send the same src_audio with the retake",
                              field="src_audio")
    seeds = retake_seeds(params, config)
    own = {name: getattr(params, name) for name in ("task_type", "source_request_id", "source_item_index",
                                                    "retake_variance")}
    resolved = dataclasses.replace(base.params, **own, retake_seeds=seeds)
    items = tuple((seed, retake_terms(base.terms, seed, params.retake_variance)) for seed in seeds)
    item_params = tuple(dataclasses.replace(resolved, seed=seed, retake_seeds=[seed]) for seed in seeds)
    return StudioPlan(params=resolved, dit_params=base.params, items=items, item_params=item_params,
                      src_audio=base.src_audio, vae_seed=base.vae_seed)


def retake_seeds(params: GenerationParams, config: GenerationConfig,
                 rng: Optional[random.Random] = None) -> list[int]:
    """One retake seed per item (``batch_size``): the given ones first (-1: random), then random."""
    rng = rng or random.SystemRandom()
    seeds = [s if s >= 0 else rng.randint(0, planning.MAX_SEED) for s in params.retake_seeds[: config.batch_size]]
    while len(seeds) < config.batch_size:
        seeds.append(rng.randint(0, planning.MAX_SEED))
    return seeds
