"""Engine load and speed figures the service exports (running/waiting sequences, tokens/s, TTFT)."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

_RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot. Sequences, not requests: a guided request runs two sequences.

    Attributes:
        num_running_seqs: sequences in the running batch after the latest step.
        num_waiting_seqs: sequences queued (never started, or preempted).
        peak_running_seqs: most sequences seen running in one step since start.
        num_generated_tokens: output tokens delivered since start (a guided pair counts once).
        tokens_per_s: output tokens delivered per second over the last ten seconds.
        last_time_to_first_token_s: of the latest request that produced a token (0 before any).
        num_finished_requests: requests that ended (any reason) since start.
        num_preemptions: requests preempted (KV cache full) since start, as vLLM reports them.
        kv_cache_usage: fraction of KV cache blocks in use after the latest step.
    """

    num_running_seqs: int = 0
    num_waiting_seqs: int = 0
    peak_running_seqs: int = 0
    num_generated_tokens: int = 0
    tokens_per_s: float = 0.0
    last_time_to_first_token_s: float = 0.0
    num_finished_requests: int = 0
    num_preemptions: int = 0
    kv_cache_usage: float = 0.0


class StatsTracker:
    """Collects figures from the engine loop; ``snapshot`` is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0
        self._peak_running = 0
        self._tokens = 0
        self._ttft_s = 0.0
        self._finished = 0
        self._preemptions = 0
        self._kv_usage = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def record_queue(self, num_running_seqs: int, num_waiting_seqs: int, kv_cache_usage: float = 0.0) -> None:
        with self._lock:
            self._running, self._waiting = num_running_seqs, num_waiting_seqs
            self._peak_running = max(self._peak_running, num_running_seqs)
            self._kv_usage = kv_cache_usage

    def record_preemptions(self, num_preemptions: int) -> None:
        with self._lock:
            self._preemptions += num_preemptions

    def record_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._tokens += num_tokens
            self._recent.append((now, num_tokens))
            self._trim(now)

    def record_first_token(self, time_to_first_token_s: float) -> None:
        with self._lock:
            self._ttft_s = time_to_first_token_s

    def record_finished(self) -> None:
        with self._lock:
            self._finished += 1

    def snapshot(self) -> EngineStats:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            window_tokens = sum(n for _, n in self._recent)
            span_s = max(now - self._recent[0][0], 1.0) if self._recent else 0.0
            return EngineStats(
                num_running_seqs=self._running,
                num_waiting_seqs=self._waiting,
                peak_running_seqs=self._peak_running,
                num_generated_tokens=self._tokens,
                tokens_per_s=window_tokens / span_s if span_s else 0.0,
                last_time_to_first_token_s=self._ttft_s,
                num_finished_requests=self._finished,
                num_preemptions=self._preemptions,
                kv_cache_usage=self._kv_usage,
            )

    def _trim(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
            self._recent.popleft()


class RequestTimeline:
    """Accumulates one request's tokens and turns them into events (both backends)."""

    def __init__(self, request_id: str, seed: int, tracker: StatsTracker) -> None:
        self.request_id = request_id
        self.seed = seed
        self.token_ids: list[int] = []
        self._tracker = tracker
        self._start = time.monotonic()
        self._ttft_s = 0.0

    def add(self, new_token_ids: list[int]) -> bool:
        """Append tokens; True when there were any."""
        if not new_token_ids:
            return False
        if not self.token_ids:
            self._ttft_s = time.monotonic() - self._start
            self._tracker.record_first_token(self._ttft_s)
        self.token_ids.extend(new_token_ids)
        self._tracker.record_tokens(len(new_token_ids))
        return True

    @property
    def time_to_first_token_s(self) -> float:
        return self._ttft_s

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start
