"""Per-stage progress of one job, as the page shows it.

The gateway reports progress per stage (LM metadata, LM codes n/N, conditioning, diffusion step
n/N, VAE decode, file encoding). :class:`ProgressBoard` keeps one row per stage: waiting, running
(with its count), done or skipped (a stage the job never entered, e.g. the LM with thinking off),
and renders them as HTML whose ``data-*`` attributes carry the numbers (the page's tests read them).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Optional

# (name, label) in pipeline order; the names are the page's, not the protobuf's.
STAGES: tuple[tuple[str, str], ...] = (
    ("queued", "Queue"),
    ("lm_metadata", "LM metadata"),
    ("lm_codes", "LM codes"),
    ("conditioning", "Conditioning"),
    ("diffusion", "Diffusion"),
    ("decode", "VAE decode"),
    ("encode", "Encode"),
)
_ORDER = {name: index for index, (name, _) in enumerate(STAGES)}


@dataclass
class StageRow:
    name: str
    label: str
    status: str = "waiting"  # waiting | running | done | skipped
    current: int = 0
    total: int = 0
    fraction: float = 0.0
    message: str = ""


class ProgressBoard:
    """What a job has done so far. Counts never go backwards within a stage (a batch's items
    report the LM codes one by one, interleaved)."""

    def __init__(self, request_id: str = "") -> None:
        self.request_id = request_id
        self.rows = {name: StageRow(name, label) for name, label in STAGES}
        self.state = "waiting"  # waiting | running | done | failed
        self.queue_position: Optional[int] = None
        self.items_ready = 0
        self.items_total = 0
        self.note = ""

    def accepted(self, request_id: str, queue_position: int) -> None:
        self.request_id = request_id
        self.queue_position = queue_position
        self.state = "running"

    def advance(self, stage: str, fraction: float, current: int, total: int, message: str) -> bool:
        """Record a progress report; True when it starts a new stage."""
        row = self.rows.get(stage)
        if row is None:
            return False
        self.state = "running"
        started = row.status != "running"
        if started:
            self._close_before(stage)
            row.status, row.fraction, row.current = "running", 0.0, 0
        row.fraction = max(row.fraction, min(max(fraction, 0.0), 1.0))
        row.current = max(row.current, current)
        row.total = max(row.total, total)
        row.message = message
        return started

    def item_ready(self, num_ready: int, num_total: int) -> None:
        self.items_ready, self.items_total = num_ready, max(num_total, num_ready)

    def finish(self) -> None:
        for row in self.rows.values():
            if row.status == "running":
                row.status, row.fraction = "done", 1.0
                row.current = row.total or row.current
            elif row.status == "waiting":
                row.status = "skipped"
        self.state = "done"

    def fail(self, message: str) -> None:
        self.state = "failed"
        self.note = message

    def _close_before(self, stage: str) -> None:
        for row in self.rows.values():
            if _ORDER[row.name] >= _ORDER[stage]:
                continue
            if row.status == "running":
                row.status, row.fraction = "done", 1.0
                row.current = row.total or row.current
            elif row.status == "waiting":
                row.status = "skipped"

    def summary(self) -> str:
        """One line: the running stage and its count, or the outcome."""
        if self.state == "failed":
            return f"failed: {self.note}"
        if self.state == "done":
            return f"done: {self.items_ready} item(s)"
        running = [row for row in self.rows.values() if row.status == "running"]
        if not running:
            return "waiting"
        row = running[-1]
        count = f" {row.current}/{row.total}" if row.total else ""
        return f"{row.label}{count}"

    def html(self) -> str:
        rows = "".join(_row_html(row) for row in self.rows.values() if row.name != "queued" or self.queue_position)
        facts = []
        if self.request_id:
            facts.append(f"job {html.escape(self.request_id)}")
        if self.queue_position:
            facts.append(f"queue position {self.queue_position}")
        if self.items_total:
            facts.append(f"{self.items_ready} of {self.items_total} item(s) ready")
        if self.note:
            facts.append(html.escape(self.note))
        return (f'<div class="studio-progress" data-state="{self.state}" data-request-id="{html.escape(self.request_id)}">'
                f'<div class="studio-summary">{html.escape(self.summary())}</div>{rows}'
                f'<div class="studio-facts">{" · ".join(facts)}</div></div>')


def _row_html(row: StageRow) -> str:
    count = f"{row.current}/{row.total}" if row.total else {"done": "done", "skipped": "skipped"}.get(row.status, "")
    title = html.escape(row.message)
    return (f'<div class="studio-stage" data-stage="{row.name}" data-status="{row.status}" '
            f'data-current="{row.current}" data-total="{row.total}" data-fraction="{row.fraction:.3f}" title="{title}">'
            f'<span class="studio-stage-name">{row.label}</span>'
            f'<progress max="1" value="{row.fraction:.3f}"></progress>'
            f'<span class="studio-stage-count">{count}</span></div>')


def idle_html(note: str = "") -> str:
    """The board before any job (or after a job that is no longer kept)."""
    board = ProgressBoard()
    board.note = note
    return board.html()
