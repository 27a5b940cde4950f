"""What the DiT worker threads do with one batch: prepare, denoise, decode and stream.

Diffusion runs on the batcher's worker thread (the DiT device's owner). With a decode queue
(``decode_queue_batches >= 1``, the default) the denoised latents are handed to a second thread
that owns the VAE decode, so diffusion of batch N+1 runs while batch N decodes; the hand-off
queue is bounded and diffusion waits when it is full (back-pressure: at most
``decode_queue_batches + 1`` batches of latents wait or decode). With ``decode_queue_batches=0``
the decode runs inline on the diffusion thread. Both paths run the same code on the same tensors,
so they produce the same bytes. Finished items go to a small CPU pool that post-processes and
encodes the file. Failures that concern one request (its source audio, NaN latents in its rows,
its file) fail that request only; a decode that raises fails the requests of that batch only.
Rows of a request cancelled while its batch waits or decodes are no longer decoded.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from dit_service.batcher import Batch
from dit_service.events import Done, FileChunk, ItemDone, PcmChunk, Progress
from dit_service.pipeline import DitPipeline, PreparedBatch
from dit_service.planning import RequestPlan, RowSpec
from dit_service.vae import check_latents
from shared import metrics
from shared.audio import encode_audio, is_output_silent, pcm16_chunks, postprocess_output, split_bytes
from shared.errors import AceStepError, Cancelled, Internal, InvalidArgument

log = logging.getLogger(__name__)

PCM_BYTES_PER_FRAME = 4  # stereo, 16-bit
ENCODER_THREADS = 2
BUSY_WINDOW_S = 30.0


class RequestState:
    """One request's rows, output settings and timings (shared by the loop, worker and encoder pool)."""

    def __init__(self, request_id: str, plan: RequestPlan, rows: list[RowSpec], audio_format: str,
                 stream_pcm: bool, return_latents: bool = False) -> None:
        self.request_id = request_id
        self.plan = plan
        self.rows = rows
        self.audio_format = audio_format
        self.stream_pcm = stream_pcm
        self.return_latents = return_latents
        self.created = time.perf_counter()
        self.num_done = 0
        self._times: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def mark_scheduled(self) -> None:
        """Record the queue wait when the request first joins a batch."""
        with self._lock:
            self._times.setdefault("dit_queue_time", time.perf_counter() - self.created)

    def add_time(self, key: str, seconds: float) -> None:
        with self._lock:
            self._times[key] += seconds

    def item_finished(self) -> bool:
        """Count one finished item; True when it was the last one."""
        with self._lock:
            self.num_done += 1
            return self.num_done == len(self.rows)

    def time_costs(self) -> dict[str, float]:
        with self._lock:
            return {**self._times, "dit_total_time_cost": time.perf_counter() - self.created}


class BatchWorker:
    """The batcher's work function (:meth:`run`) plus the file-encoding pool."""

    def __init__(self, pipeline: DitPipeline, *, file_chunk_bytes: int, pcm_chunk_bytes: int,
                 decode_queue_batches: int = 1) -> None:
        if decode_queue_batches < 0:
            raise InvalidArgument(f"decode_queue_batches must be >= 0, got {decode_queue_batches}",
                                  field="decode_queue_batches")
        self.pipeline = pipeline
        self.file_chunk_bytes = file_chunk_bytes
        self.pcm_chunk_samples = max(1, pcm_chunk_bytes // PCM_BYTES_PER_FRAME)
        self._encoders = concurrent.futures.ThreadPoolExecutor(ENCODER_THREADS, thread_name_prefix="dit-encode")
        self._diffusion_busy = BusyMeter("diffusion")
        self._decode_busy = BusyMeter("decode")
        self.decoder = DecodeStage(self._decode_job, decode_queue_batches) if decode_queue_batches else None

    def close(self) -> None:
        """Decode what was handed off, then write the remaining files."""
        if self.decoder is not None:
            self.decoder.close()
        self._encoders.shutdown(wait=True)

    def run(self, batch: Batch) -> None:
        """Synthesize the batch's rows; emits every event and ends each request it completes.

        With a decode stage it returns once the latents are handed off (waiting while the queue is full).
        """
        with self._diffusion_busy:
            job = self._diffuse(batch)
        if job is None:
            return
        if self.decoder is None:
            self._decode_job(job)
        else:
            self.decoder.put(job)

    def _diffuse(self, batch: Batch) -> DecodeJob | None:
        failed: set[str] = set()
        for request_id, state in _states(batch).items():
            self._guard(batch, request_id, failed, lambda s=state: self.pipeline.prepare_sources(s.plan))
        active = [i for i in batch.live_rows() if batch.rows[i].request_id not in failed]
        if not active:
            return None
        live = _live_subset(batch, active, failed)
        self._progress(batch, active, live, Progress("conditioning", 0.0, message="encoding text and audio"))
        started = time.perf_counter()
        prepared = self.pipeline.prepare([_spec(batch, i) for i in active])
        self._add_time(batch, active, "dit_conditioning_time", started)
        metrics.DIT_CONDITION_SECONDS.observe(time.perf_counter() - started)
        latents = self._denoise(batch, active, prepared, live)
        if latents is None:
            return None
        self._check(batch, active, latents, failed)
        return DecodeJob(batch, active, prepared, latents, live)

    def _decode_job(self, job: DecodeJob) -> None:
        """Decode one handed-off batch; an error fails the requests of that batch only."""
        if not job.live():
            return  # every row was cancelled while the batch waited
        try:
            with self._decode_busy:
                self._decode(job.batch, job.active, job.prepared, job.latents, job.live)
        except AceStepError as error:
            for request_id in dict.fromkeys(job.batch.rows[i].request_id for i in job.active):
                job.batch.fail(request_id, error)
        except Exception as exc:  # noqa: BLE001 - logged here, clients get a generic INTERNAL
            log.error("VAE decode failed", exc_info=exc)
            for request_id in dict.fromkeys(job.batch.rows[i].request_id for i in job.active):
                job.batch.fail(request_id, Internal("VAE decode failed with an internal error"))

    def _denoise(self, batch: Batch, active: list[int], prepared: PreparedBatch, live: Callable) -> Tensor | None:
        started = last = time.perf_counter()

        def on_step(step: int, num_steps: int) -> None:
            nonlocal last
            now = time.perf_counter()
            metrics.DIT_STEP_SECONDS.observe(now - last)
            last = now
            self._progress(batch, active, live, Progress("diffusion", (step + 1) / num_steps, step + 1, num_steps))

        try:
            latents = self.pipeline.denoise(prepared, live_rows=live, on_step=on_step)
        except Cancelled:
            return None  # every request of the batch went away
        self._add_time(batch, active, "dit_diffusion_time", started)
        return latents

    def _check(self, batch: Batch, active: list[int], latents: Tensor, failed: set[str]) -> None:
        """NaN/Inf or all-zero latents fail the requests they belong to."""
        for request_id in {batch.rows[i].request_id for i in active}:
            rows = [j for j, i in enumerate(active) if batch.rows[i].request_id == request_id]
            self._guard(batch, request_id, failed, lambda r=rows: check_latents(latents[r]))

    def _decode(self, batch: Batch, active: list[int], prepared: PreparedBatch, latents: Tensor,
                live: Callable) -> None:
        """Tile by tile: PCM to streaming requests, whole items to the encoder pool."""
        hop, started = self.pipeline.hop_samples, time.perf_counter()
        lengths = [frames * hop for frames in prepared.num_frames]
        pieces: list[list[np.ndarray]] = [[] for _ in active]
        for tile in self.pipeline.decode_tiles(latents, prepared.num_frames, live):
            for k, j in enumerate(tile.rows):
                row = batch.rows[active[j]]
                piece = tile.audio[k, :, : max(0, lengths[j] - tile.start_sample)].numpy()  # [2, n]
                pieces[j].append(piece)
                is_last = tile.start_sample + piece.shape[-1] >= lengths[j]
                if row.payload.stream_pcm:
                    self._emit_pcm(batch, row.request_id, row.item_index, tile.start_sample, piece, is_last)
                if is_last:
                    audio = np.concatenate(pieces[j], axis=-1)  # [2, length]
                    pieces[j] = []
                    metrics.DIT_DECODE_SECONDS.observe(time.perf_counter() - started)
                    own = latents[j, : prepared.num_frames[j]].float().cpu().numpy() \
                        if row.payload.return_latents else None  # [T, 64]
                    self._encoders.submit(self._finish_item, batch, row.payload, row.item_index, audio, own)
            done = tile.start_sample + tile.audio.shape[-1]
            self._progress(batch, active, live, Progress("decode", min(1.0, done / max(lengths)), message="VAE decode"))
        self._add_time(batch, active, "dit_decode_time", started)

    def _emit_pcm(self, batch: Batch, request_id: str, item_index: int, start: int, piece: np.ndarray,
                  is_last: bool) -> None:
        chunks = list(pcm16_chunks(piece, self.pcm_chunk_samples))
        for index, data in enumerate(chunks):
            event = PcmChunk(item_index, self.pipeline.sample_rate_hz, piece.shape[0],
                             start + index * self.pcm_chunk_samples, data, is_last and index == len(chunks) - 1)
            batch.emit(request_id, event)

    def _finish_item(self, batch: Batch, state: RequestState, item_index: int, audio: np.ndarray,
                     latents: np.ndarray | None = None) -> None:
        """Post-process, encode and stream one item's file; the request's last item sends Done."""
        request_id = state.request_id
        if not batch.is_live(request_id):
            return
        started = time.perf_counter()
        try:
            if is_output_silent(audio):
                log.warning("item %d of request %s is silent", item_index, request_id)
            batch.emit(request_id, Progress("encode", 0.0, message=f"encoding item {item_index}"))
            data = encode_audio(postprocess_output(audio), state.audio_format, self.pipeline.sample_rate_hz)
            offset = 0
            chunks = split_bytes(data, self.file_chunk_bytes)
            for index, chunk in enumerate(chunks):
                batch.emit(request_id, FileChunk(item_index, state.audio_format, offset, chunk,
                                                 index == len(chunks) - 1, len(data)))
                offset += len(chunk)
            rate, num_samples = self.pipeline.sample_rate_hz, audio.shape[-1]
            batch.emit(request_id, ItemDone(item_index, state.rows[item_index].seed, rate, num_samples,
                                            num_samples / rate, latents))
            metrics.DIT_ITEMS.labels("ok").inc()
            state.add_time("dit_encode_time", time.perf_counter() - started)
            if state.item_finished():
                batch.emit(request_id, Done(state.time_costs()))
                batch.finish(request_id)
        except AceStepError as error:
            batch.fail(request_id, error)
        except Exception as exc:  # noqa: BLE001 - logged; the client gets a generic INTERNAL
            log.error("encoding item %d of request %s failed", item_index, request_id, exc_info=exc)
            batch.fail(request_id, Internal(f"encoding item {item_index} failed"))

    def _progress(self, batch: Batch, active: list[int], live: Callable, event: Progress) -> None:
        for request_id in dict.fromkeys(batch.rows[active[j]].request_id for j in live()):
            batch.emit(request_id, event)

    def _add_time(self, batch: Batch, active: Sequence[int], key: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        for state in {id(batch.rows[i].payload): batch.rows[i].payload for i in active}.values():
            state.add_time(key, elapsed)

    @staticmethod
    def _guard(batch: Batch, request_id: str, failed: set[str], fn: Callable[[], object]) -> None:
        """Run ``fn``; a typed error fails only ``request_id`` (recorded in ``failed``)."""
        try:
            fn()
        except AceStepError as error:
            failed.add(request_id)
            batch.fail(request_id, error)


def _states(batch: Batch) -> dict[str, RequestState]:
    return {row.request_id: row.payload for row in batch.rows}


def _spec(batch: Batch, index: int) -> RowSpec:
    row = batch.rows[index]
    return row.payload.rows[row.item_index]


def _live_subset(batch: Batch, active: list[int], failed: set[str]) -> Callable[[], list[int]]:
    """Positions in ``active`` whose request is still live and has not failed here."""

    def live() -> list[int]:
        alive = set(batch.live_rows())
        return [j for j, i in enumerate(active) if i in alive and batch.rows[i].request_id not in failed]

    return live


@dataclass(frozen=True)
class DecodeJob:
    """Denoised latents ``[B, T, 64]`` of ``batch`` rows ``active``, waiting for the VAE."""

    batch: Batch
    active: list[int]
    prepared: PreparedBatch
    latents: Tensor
    live: Callable[[], list[int]]


class BusyMeter:
    """Context manager timing one stage's work: a busy-seconds counter and the busy fraction of
    the last window of ``BUSY_WINDOW_S`` seconds (1.0: the stage never waited)."""

    def __init__(self, stage: str) -> None:
        self._seconds = metrics.DIT_STAGE_BUSY_SECONDS.labels(stage)
        self._fraction = metrics.DIT_STAGE_BUSY_FRACTION.labels(stage)
        self._window_start = time.perf_counter()
        self._window_busy = 0.0
        self._started = 0.0

    def __enter__(self) -> BusyMeter:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        now = time.perf_counter()
        busy = now - self._started
        self._seconds.inc(busy)
        self._window_busy += busy
        elapsed = now - self._window_start
        if elapsed > 0:
            self._fraction.set(min(1.0, self._window_busy / elapsed))
        if elapsed >= BUSY_WINDOW_S:
            self._window_start, self._window_busy = now, 0.0


class DecodeStage:
    """A decode thread fed by a bounded queue of :class:`DecodeJob` (``put`` blocks when full)."""

    def __init__(self, decode: Callable[[DecodeJob], None], max_batches: int) -> None:
        self.max_batches = max_batches
        self.is_waiting_for_room = threading.Event()  # set while a put waits on a full queue
        self._decode = decode
        self._queue: queue.Queue[DecodeJob | None] = queue.Queue(max_batches)
        self._thread = threading.Thread(target=self._loop, name="dit-decode", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting in the queue (not counting the one being decoded)."""
        return self._queue.qsize()

    def put(self, job: DecodeJob) -> None:
        if self._queue.full():
            metrics.DIT_DECODE_BACKPRESSURE.inc()
            self.is_waiting_for_room.set()
        self._queue.put(job)
        self.is_waiting_for_room.clear()
        metrics.DIT_DECODE_QUEUE_DEPTH.set(self._queue.qsize())

    def close(self) -> None:
        """Decode every queued job, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            metrics.DIT_DECODE_QUEUE_DEPTH.set(self._queue.qsize())
            if job is None:
                return
            self._decode(job)
