"""A tab's result panel: live per-stage progress, one player per item (filled as each item
finishes, with download and "Send to" buttons), the resolved parameters JSON, and the job id
kept in the browser so that a reloaded page follows the job again or shows its result.

Output order of a panel's events (what ``gradio_client`` receives): the first item's audio, the
parameters JSON (v1's ``result[0]`` / ``result[1]``), the other items' audio, the progress HTML,
the remembered job; then values the API does not see (per-item records, player visibility).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import gradio as gr

from studio.jobs import GatewayLink, JobView, StudioError
from studio.progress import idle_html

# Tabs a result can be sent to: (tab id, button label).
SEND_TARGETS: tuple[tuple[str, str], ...] = (
    ("retake", "Retake"), ("repaint", "Repaint"), ("edit", "Edit"), ("extend", "Extend"), ("cover", "Cover"),
)


@dataclass
class Slot:
    column: Any
    audio: Any
    send_buttons: dict[str, Any]


def job_state(name: str, state_secret: str) -> Any:
    """The job id of a tab's last run, kept in the browser's localStorage (encrypted)."""
    return gr.BrowserState(None, storage_key=f"acestep-studio-job-{name}", secret=state_secret)


class ResultPanel:
    """Built inside the tab's layout; ``run`` and ``reattach`` drive it. ``job`` is the tab's
    :func:`job_state`, made outside the tabs: a component in a tab the page has not shown yet is
    not mounted, and an unmounted BrowserState never reads the browser's storage."""

    def __init__(self, name: str, label: str, num_slots: int, job: Any) -> None:
        self.name = name
        self.progress = gr.HTML(idle_html(), label=f"{label} progress", elem_id=f"{name}-progress",
                                elem_classes=["studio-board"])
        self.slots: list[Slot] = []
        for index in range(num_slots):
            with gr.Column(visible=False, elem_id=f"{name}-item-{index}", elem_classes=["studio-item"]) as column:
                audio = gr.Audio(type="filepath", label=f"{label} item {index + 1}", interactive=False,
                                 buttons=["download"], elem_id=f"{name}-audio-{index}")
                with gr.Row():
                    buttons = {target: gr.Button(f"→ {text}", size="sm", min_width=60,
                                                 elem_id=f"{name}-send-{target}-{index}")
                               for target, text in SEND_TARGETS}
            self.slots.append(Slot(column, audio, buttons))
        self.params_json = gr.JSON(label=f"{label} parameters", elem_id=f"{name}-params", max_height=360)
        self.job = job
        self.records = gr.State([])  # one parameters record per finished item, for "Send to"

    @property
    def outputs(self) -> list[Any]:
        audios = [slot.audio for slot in self.slots]
        return [audios[0], self.params_json, *audios[1:], self.progress, self.job, self.records,
                *(slot.column for slot in self.slots)]

    def _frame(self, view: Optional[JobView], shown: set[int], final: bool, job: Any = None,
               board_html: Optional[str] = None) -> list[Any]:
        """Values for ``outputs``. Players already filled are left alone until the last frame,
        so an item keeps playing while later ones are made."""
        audios, columns = [], []
        for index in range(len(self.slots)):
            item = view.items.get(index) if view else None
            if item is None:
                audios.append(None if final else gr.skip())
                columns.append(gr.update(visible=False) if final else gr.skip())
            elif index in shown and not final:
                audios.append(gr.skip())
                columns.append(gr.skip())
            else:
                shown.add(index)
                audios.append(item.audio_path)
                columns.append(gr.update(visible=True))
        record = view.record() if view and (view.items or view.is_done) else None
        records = [view.record(index) for index in sorted(view.items)] if view else []
        board = board_html if board_html is not None else (view.board.html() if view else idle_html())
        return [audios[0], record, *audios[1:], board, job if job is not None else gr.skip(), records, *columns]

    def cleared(self, view: JobView) -> list[Any]:
        """The first frame of a new job: the previous results go, the job id is remembered."""
        values = self._frame(None, set(), final=True, job={"request_id": view.request_id},
                             board_html=view.board.html())
        return values

    def follow(self, link: GatewayLink, request_id: str) -> Iterator[list[Any]]:
        """Frames of a job until it ends; a failure shows on the board, then raises."""
        shown: set[int] = set()
        view: Optional[JobView] = None
        try:
            for view in link.follow(request_id):
                yield self._frame(view, shown, final=view.is_done)
        except StudioError:
            if view is not None:
                yield self._frame(view, shown, final=True)
            raise

    def run(self, link: GatewayLink, params: Any, config: Any) -> Iterator[list[Any]]:
        request_id = link.submit(params, config)
        yield self.cleared(JobView(request_id))
        yield from self.follow(link, request_id)

    def reattach(self, link: GatewayLink, job: Any) -> Iterator[list[Any]]:
        """On page load: follow the remembered job (its events replay from the start, so a
        finished job shows its result at once); a job the gateway no longer keeps is forgotten."""
        request_id = job.get("request_id") if isinstance(job, dict) else None
        if not request_id:
            yield [gr.skip()] * len(self.outputs)
            return
        try:
            yield from self.follow(link, request_id)
        except StudioError as error:
            if error.code == "NOT_FOUND":
                yield self._frame(None, set(), final=True, job={},
                                  board_html=idle_html(f"job {request_id} is no longer kept"))
            # a failed job has shown its failure on the board; nothing to raise on a page load
