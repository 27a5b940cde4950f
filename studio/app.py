"""The studio page: a Gradio app that is a client of the gateway (no model code in this process).

Tabs: Generate, Retake, Repaint, Edit, Extend, Cover, Understand. Named API endpoints (the
names ``gradio_client`` scripts call; v1's where v1 had the function):

    /__call__              Generate (v1's Text2Music)       /retake_process_func   Retake
    /repaint_process_func  Repaint                          /edit_process_func     Edit
    /extend_process_func   Extend                           /cover_process_func    Cover
    /create_sample         description → caption, lyrics, metadata
    /format_sample         caption + lyrics → enhanced caption and metadata
    /understand_music      audio (or codes) → caption, lyrics, metadata

Every generation endpoint returns ``(audio of item 1, parameters JSON, audio of items 2.., progress
HTML, job)``; the parameters JSON of a result is the ``json_data`` that Retake (and the source of
Repaint / Edit / Extend / Cover) takes. docs/studio-page.md documents each parameter.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import gradio as gr

from gateway import sdk
from studio import forms, tabs
from studio.forms import InvalidInput, SourceRef
from studio.jobs import GatewayLink, StudioError
from studio.panel import SEND_TARGETS, ResultPanel, job_state

GENERATE_SLOTS = 8
OP_SLOTS = forms.MAX_OP_ITEMS
CSS = """
.studio-progress {font-size: 0.9em}
.studio-stage {display: grid; grid-template-columns: 8em 1fr 6em; gap: 0.5em; align-items: center}
.studio-stage[data-status="waiting"], .studio-stage[data-status="skipped"] {opacity: 0.45}
.studio-stage progress {width: 100%}
.studio-summary {font-weight: 600; margin-bottom: 0.3em}
.studio-progress[data-state="failed"] .studio-summary {color: #c0392b}
.studio-facts {opacity: 0.7; margin-top: 0.3em}
"""


@dataclass(frozen=True)
class StudioSettings:
    state_secret: str = ""    # encrypts the job id kept in the browser; empty: random per process
    title: str = "ACE-Step 1.5 Studio"


def _user_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Refusals reach the user as gr.Error with the gateway's message (a toast on the page, an
    AppError in gradio_client), titled after the status code."""
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def streaming(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from handler(*args, **kwargs)
            except (StudioError, InvalidInput) as error:
                raise _as_gr_error(error) from None
        return streaming

    @functools.wraps(handler)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except (StudioError, InvalidInput) as error:
            raise _as_gr_error(error) from None
    return plain


def _as_gr_error(error: Exception) -> gr.Error:
    title = "Invalid input" if isinstance(error, InvalidInput) else error.title
    return gr.Error(error.message, title=title)


class Studio:
    """The page's handlers: each turns a tab's values into a gateway job and drives its panel."""

    def __init__(self, link: GatewayLink) -> None:
        self.link = link
        self.panels: dict[str, ResultPanel] = {}

    def _audio_of(self, source: forms.Source) -> Any:
        """Repaint and Cover take the source audio itself: a result's file is fetched."""
        if isinstance(source, SourceRef):
            return self.link.audio_bytes(source.request_id, source.item_index)
        return source

    def generate(self, **values: Any) -> Iterator[list[Any]]:
        params, config = forms.generate_request(values)
        yield from self.panels["generate"].run(self.link, params, config)

    def retake(self, **values: Any) -> Iterator[list[Any]]:
        params, config = forms.retake_request(values)
        yield from self.panels["retake"].run(self.link, params, config)

    def repaint(self, **values: Any) -> Iterator[list[Any]]:
        source = self._audio_of(forms.pick_source(values, "repaint_source"))
        params, config = forms.repaint_request(values, source)
        yield from self.panels["repaint"].run(self.link, params, config)

    def edit(self, **values: Any) -> Iterator[list[Any]]:
        params, config = forms.edit_request(values, forms.pick_source(values, "edit_source"))
        yield from self.panels["edit"].run(self.link, params, config)

    def extend(self, **values: Any) -> Iterator[list[Any]]:
        params, config = forms.extend_request(values, forms.pick_source(values, "extend_source"))
        yield from self.panels["extend"].run(self.link, params, config)

    def cover(self, **values: Any) -> Iterator[list[Any]]:
        source = self._audio_of(forms.pick_source(values, "cover_source"))
        params, config = forms.cover_request(values, source)
        yield from self.panels["cover"].run(self.link, params, config)

    def create_sample(self, query: Optional[str] = None, instrumental: Optional[bool] = None,
                      vocal_language: Optional[str] = None) -> tuple[Any, ...]:
        if not (query or "").strip():
            raise InvalidInput("query", "query is empty: describe the song to create")
        language = None if vocal_language in (None, "", "unknown") else vocal_language
        result = self.link.lm_call(sdk.create_sample, query, instrumental=bool(instrumental),
                                   vocal_language=language)
        return _metadata_values(result) + (result.instrumental,)

    def format_sample(self, prompt: Optional[str] = None, lyrics: Optional[str] = None, bpm: Any = None,
                      keyscale: Optional[str] = None, timesignature: Optional[str] = None,
                      audio_duration: Any = None, vocal_language: Optional[str] = None) -> tuple[Any, ...]:
        metadata = {"bpm": forms.optional_int(bpm), "keyscale": keyscale or "", "timesignature": timesignature or "",
                    "duration": float(audio_duration) if audio_duration and float(audio_duration) > 0 else None,
                    "language": "" if vocal_language in (None, "unknown") else vocal_language}
        result = self.link.lm_call(sdk.format_sample, prompt or "", lyrics or "", user_metadata=metadata)
        return _metadata_values(result)

    def understand_music(self, source_audio: Any = None, audio_codes: Optional[str] = None,
                         temperature: Optional[float] = None) -> tuple[Any, ...]:
        if not source_audio and not (audio_codes or "").strip():
            raise InvalidInput("source_audio", "nothing to understand: upload audio or paste audio codes")
        result = self.link.lm_call(sdk.understand_music, audio_codes=audio_codes or "",
                                   temperature=0.85 if temperature is None else float(temperature), audio=source_audio or None)
        metadata = {"bpm": result.bpm, "duration": result.duration, "keyscale": result.keyscale,
                    "language": result.language, "timesignature": result.timesignature}
        return result.caption, result.lyrics, metadata


def _metadata_values(result: Any) -> tuple[Any, ...]:
    """prompt, lyrics, bpm, keyscale, timesignature, audio_duration, vocal_language of the form."""
    duration = result.duration if result.duration else gr.skip()
    return (result.caption, result.lyrics, result.bpm, result.keyscale, result.timesignature or "", duration,
            result.language or "unknown")


def build_page(link: GatewayLink, settings: StudioSettings = StudioSettings()) -> gr.Blocks:
    studio = Studio(link)
    with gr.Blocks(title=settings.title, analytics_enabled=False) as page:
        gr.Markdown(f"## {settings.title}")
        jobs = {name: job_state(name, settings.state_secret) for name in API_NAMES}
        with gr.Tabs(elem_id="studio-tabs") as tab_set:
            controls = _build_tabs(studio, jobs)
        _wire(page, studio, controls, tab_set)
    return page


def _panel_tab(studio: Studio, name: str, label: str, build: Callable[[], dict[str, Any]], slots: int,
               job: Any) -> tuple[dict[str, Any], Any]:
    with gr.Tab(label, id=name):
        with gr.Row():
            with gr.Column():
                controls = build()
                button = gr.Button(label, variant="primary", elem_id=f"{name}-button")
            with gr.Column():
                studio.panels[name] = ResultPanel(name, label, slots, job)
    return controls, button


def _build_tabs(studio: Studio, jobs: dict[str, Any]) -> dict[str, Any]:
    built: dict[str, Any] = {}
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column():
                built["generate"] = tabs.generate_controls()
                with gr.Row():
                    built["generate_button"] = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    built["format_button"] = gr.Button("Format", elem_id="format-button")
                with gr.Accordion("Create sample from a description", open=False):
                    built["sample"] = tabs.sample_controls()
                    built["sample_button"] = gr.Button("Create sample", elem_id="create-sample-button")
            with gr.Column():
                studio.panels["generate"] = ResultPanel("generate", "Generate", GENERATE_SLOTS, jobs["generate"])
    for name, label, build in (("retake", "Retake", tabs.retake_controls),
                               ("repaint", "Repaint", tabs.repaint_controls),
                               ("edit", "Edit", tabs.edit_controls),
                               ("extend", "Extend", tabs.extend_controls),
                               ("cover", "Cover", tabs.cover_controls)):
        built[name], built[f"{name}_button"] = _panel_tab(studio, name, label, build, OP_SLOTS, jobs[name])
    with gr.Tab("Understand", id="understand"):
        with gr.Row():
            with gr.Column():
                built["understand"] = tabs.understand_controls()
                built["understand_button"] = gr.Button("Understand", variant="primary", elem_id="understand-button")
            with gr.Column():
                built["understand_out"] = [gr.Textbox(label="Caption", elem_id="understand-caption"),
                                           gr.Textbox(label="Lyrics", lines=8), gr.JSON(label="Metadata")]
    return built


# API name of each generation tab's button (v1's function names).
API_NAMES = {"generate": "__call__", "retake": "retake_process_func", "repaint": "repaint_process_func",
             "edit": "edit_process_func", "extend": "extend_process_func", "cover": "cover_process_func"}


def _wire(page: gr.Blocks, studio: Studio, built: dict[str, Any], tab_set: Any) -> None:
    for name, api_name in API_NAMES.items():
        panel = studio.panels[name]
        handler = _keyword_signature(_user_errors(getattr(studio, name)), built[name])
        built[f"{name}_button"].click(handler, inputs_kwargs=built[name], outputs=panel.outputs,
                                      api_name=api_name, show_progress="hidden")
        page.load(_user_errors(functools.partial(panel.reattach, studio.link)), inputs=[panel.job],
                  outputs=panel.outputs, api_visibility="private", show_progress="hidden")
    form = built["generate"]
    text_fields = [form[n] for n in ("prompt", "lyrics", "bpm", "keyscale", "timesignature", "audio_duration",
                                     "vocal_language")]
    built["sample_button"].click(_user_errors(studio.create_sample),
                                 inputs=[built["sample"]["query"], form["instrumental"], form["vocal_language"]],
                                 outputs=[*text_fields, form["instrumental"]], api_name="create_sample")
    built["format_button"].click(_user_errors(studio.format_sample), inputs=text_fields, outputs=text_fields,
                                 api_name="format_sample")
    understand = built["understand"]
    built["understand_button"].click(_user_errors(studio.understand_music),
                                     inputs=[understand["source_audio"], understand["audio_codes"],
                                             understand["temperature"]],
                                     outputs=built["understand_out"], api_name="understand_music")
    edit = built["edit"]
    edit["edit_type"].change(_edit_range, inputs=[edit["edit_type"]], outputs=[edit["edit_n_min"], edit["edit_n_max"]],
                             api_visibility="private", show_progress="hidden")
    _wire_send_to(studio, built, tab_set)


def _edit_range(edit_type: str) -> tuple[float, float]:
    """v1's starting ranges: only_lyrics edits late in the trajectory, remix earlier."""
    return (0.2, 0.4) if edit_type == "remix" else (0.6, 1.0)


def _keyword_signature(handler: Callable[..., Any], names: dict[str, Any]) -> Callable[..., Any]:
    """Give a ``**values`` handler one keyword parameter (default None) per API parameter, so that
    gradio_client treats a control without an initial value (an empty upload) as optional."""
    handler.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names])
    return handler


def _wire_send_to(studio: Studio, built: dict[str, Any], tab_set: Any) -> None:
    """Each item's "→ Retake / Repaint / Edit / Extend / Cover" button: its parameters record
    becomes the target tab's source; tabs that take a caption and lyrics get the source's."""
    for panel in studio.panels.values():
        for index, slot in enumerate(panel.slots):
            for target, _ in SEND_TARGETS:
                fields = built[target]
                outputs = [fields["json_data"], tab_set]
                if target != "retake":
                    outputs += [fields[f"{target}_source"], fields["prompt"], fields["lyrics"]]
                slot.send_buttons[target].click(functools.partial(_send, index, target),
                                                inputs=[panel.records], outputs=outputs,
                                                api_visibility="private", show_progress="hidden")


def _send(index: int, target: str, records: list[dict[str, Any]]) -> list[Any]:
    if index >= len(records or []):
        raise gr.Error("this item is not finished yet", title="Nothing to send")
    record = records[index]
    if target == "retake":
        return [record, gr.Tabs(selected=target)]
    params = record.get("params") or {}
    return [record, gr.Tabs(selected=target), "text2music", params.get("caption", ""), params.get("lyrics", "")]
