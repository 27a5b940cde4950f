"""The input controls of each tab, keyed by their API parameter names.

Each builder lays out its controls inside the current Gradio context and returns
``{api_parameter_name: component}``; the page passes that dict as ``inputs_kwargs``, so the names
here are the names ``gradio_client`` scripts use (v1's where v1 had the control).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from shared.constants import BASE_MAX_STEPS, BATCH_SIZE_MAX, GUIDANCE_MAX, GUIDANCE_MIN, VALID_LANGUAGES
from studio.forms import AUDIO_FORMATS, CFG_TYPES, EDIT_TYPES, SOURCE_CHOICES

Controls = dict[str, Any]
TIME_SIGNATURES = ("", "2", "3", "4", "6")


def _dit_controls() -> Controls:
    return {
        "infer_step": gr.Slider(1, BASE_MAX_STEPS, value=8, step=1, label="Inference steps",
                                info="turbo models: at most 20"),
        "guidance_scale": gr.Slider(GUIDANCE_MIN, GUIDANCE_MAX, value=7.0, step=0.1, label="Guidance scale"),
    }


def generate_controls() -> Controls:
    """Generate (v1's Text2Music): text, metadata, LM and DiT settings, seeds, batch, format."""
    c: Controls = {}
    c["prompt"] = gr.Textbox(label="Caption", lines=3, elem_id="generate-caption",
                             placeholder="genre, mood, instruments, voice, e.g. 'lo-fi hip hop, mellow piano'")
    c["lyrics"] = gr.Textbox(label="Lyrics", lines=8, elem_id="generate-lyrics",
                             placeholder="[Verse]\n...\n[Chorus]\n... ('[Instrumental]' for none)")
    with gr.Row():
        c["instrumental"] = gr.Checkbox(False, label="Instrumental")
        c["audio_duration"] = gr.Number(-1, label="Duration (s)", info="10–600; -1: automatic",
                                        elem_id="generate-duration")
        c["batch_size"] = gr.Slider(1, BATCH_SIZE_MAX, value=2, step=1, label="Batch size",
                                    elem_id="generate-batch-size")
        c["format"] = gr.Dropdown(list(AUDIO_FORMATS), value="flac", label="Format")
    c["manual_seeds"] = gr.Textbox(label="Seeds", placeholder="empty: random; e.g. 42 or 1, 2",
                                   elem_id="generate-seeds")
    with gr.Accordion("Metadata (empty: planned by the LM)", open=False):
        with gr.Row():
            c["bpm"] = gr.Number(None, label="BPM", info="30–300")
            c["keyscale"] = gr.Textbox(label="Key", placeholder="e.g. C major, F# minor")
            c["timesignature"] = gr.Dropdown(list(TIME_SIGNATURES), value="", label="Time signature")
            c["vocal_language"] = gr.Dropdown(list(VALID_LANGUAGES), value="unknown", label="Vocal language")
    with gr.Accordion("LM (5 Hz planner)", open=False):
        with gr.Row():
            c["thinking"] = gr.Checkbox(True, label="Thinking (LM writes metadata and audio codes)",
                                        elem_id="generate-thinking")
            c["use_cot_metas"] = gr.Checkbox(True, label="LM plans metadata", elem_id="generate-cot-metas")
            c["use_cot_caption"] = gr.Checkbox(True, label="LM rewrites caption", elem_id="generate-cot-caption")
            c["use_cot_language"] = gr.Checkbox(True, label="LM detects language", elem_id="generate-cot-language")
        with gr.Row():
            c["lm_temperature"] = gr.Slider(0.0, 2.0, value=0.85, step=0.05, label="Temperature")
            c["lm_cfg_scale"] = gr.Slider(1.0, 5.0, value=2.0, step=0.1, label="LM CFG scale")
            c["lm_top_k"] = gr.Number(0, label="Top-k (0: off)", precision=0)
            c["lm_top_p"] = gr.Slider(0.0, 1.0, value=0.9, step=0.01, label="Top-p")
        c["lm_negative_prompt"] = gr.Textbox("NO USER INPUT", label="LM negative prompt")
    with gr.Accordion("DiT", open=False):
        with gr.Row():
            c.update(_dit_controls())
            c["cfg_type"] = gr.Dropdown(list(CFG_TYPES), value="apg", label="Guidance type",
                                        info="apg (1.5's default), cfg, cfg_star or adg")
        with gr.Row():
            c["shift"] = gr.Slider(1.0, 5.0, value=1.0, step=0.1, label="Shift")
            c["infer_method"] = gr.Dropdown(["ode", "sde"], value="ode", label="Sampler")
            c["cfg_interval_start"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Guidance from")
            c["cfg_interval_end"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Guidance until")
    with gr.Accordion("Reference audio and LoRA", open=False):
        c["ref_audio_input"] = gr.Audio(type="filepath", sources=["upload"], label="Reference audio (timbre)")
        with gr.Row():
            c["lora_name_or_path"] = gr.Textbox("none", label="LoRA adapter id", info="'none': no adapter")
            c["lora_weight"] = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="LoRA weight")
    return c


def sample_controls() -> Controls:
    """Create sample: a description → caption, lyrics and metadata (filled into the form)."""
    return {"query": gr.Textbox(label="Describe the song", elem_id="generate-query",
                                placeholder="e.g. a soft Bengali love song for a quiet evening")}


def source_controls(tab: str, choice_field: str) -> Controls:
    """The source of an operation: a result sent here, or an uploaded file."""
    c: Controls = {}
    c["json_data"] = gr.JSON(label="Source result (sent here with a result's '→' button)", elem_id=f"{tab}-source",
                             max_height=240)
    c[choice_field] = gr.Radio(list(SOURCE_CHOICES), value="text2music", label="Source",
                               info="text2music: the result above; upload: the file below", elem_id=f"{tab}-source-choice")
    c["source_audio"] = gr.Audio(type="filepath", sources=["upload"], label="Upload audio")
    return c


def _text_controls(tab: str, what: str) -> Controls:
    return {"prompt": gr.Textbox(label=f"Caption{what}", lines=2, elem_id=f"{tab}-caption"),
            "lyrics": gr.Textbox(label=f"Lyrics{what}", lines=4, elem_id=f"{tab}-lyrics")}


def _seeds(tab: str, field: str) -> Controls:
    return {field: gr.Textbox(label=f"{tab.capitalize()} seeds", placeholder="empty: random; e.g. 7 or 7, 8",
                              elem_id=f"{tab}-seeds")}


def _format() -> Controls:
    return {"format": gr.Dropdown(list(AUDIO_FORMATS), value="flac", label="Format")}


def retake_controls() -> Controls:
    c: Controls = {"json_data": gr.JSON(label="Source result (sent here with a result's '→ Retake' button)",
                                        elem_id="retake-source", max_height=320)}
    c["retake_variance"] = gr.Slider(0.0, 1.0, value=0.2, step=0.01, label="Variance", elem_id="retake-variance",
                                     info="0: the same song; 1: a new song with the retake seed")
    c.update(_seeds("retake", "retake_seeds"))
    with gr.Accordion("Source made from an upload?", open=False):
        c["source_audio"] = gr.Audio(type="filepath", sources=["upload"], label="The same upload again",
                                     elem_id="retake-upload")
    return c


def repaint_controls() -> Controls:
    c = source_controls("repaint", "repaint_source")
    c.update(_text_controls("repaint", " (empty: the source's)"))
    with gr.Row():
        c["repaint_start"] = gr.Number(0.0, label="Repaint start (s)")
        c["repaint_end"] = gr.Number(-1.0, label="Repaint end (s)", info="-1: the end of the source")
    c.update(_seeds("repaint", "retake_seeds"))
    with gr.Row():
        c.update(_dit_controls())
        c.update(_format())
    return c


def edit_controls() -> Controls:
    c = source_controls("edit", "edit_source")
    c.update(_text_controls("edit", " of the source (empty: the source's)"))
    c["edit_type"] = gr.Radio(list(EDIT_TYPES), value="only_lyrics", label="Edit type", elem_id="edit-type",
                              info="only_lyrics keeps the melody; remix may change melody and genre")
    c["edit_prompt"] = gr.Textbox(label="New caption (remix)", lines=2, elem_id="edit-new-caption")
    c["edit_lyrics"] = gr.Textbox(label="New lyrics", lines=4, elem_id="edit-new-lyrics")
    with gr.Row():  # v1's slice of the trajectory, counted from the noise end
        c["edit_n_min"] = gr.Slider(0.0, 1.0, value=0.6, step=0.01, label="edit_n_min", elem_id="edit-n-min",
                                    info="v1's scale: 0 = noise end")
        c["edit_n_max"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="edit_n_max", elem_id="edit-n-max",
                                    info="1 = data end; only_lyrics 0.6–1.0, remix 0.2–0.4")
    c.update(_seeds("edit", "edit_seeds"))
    with gr.Row():
        c.update(_dit_controls())
        c.update(_format())
    return c


def extend_controls() -> Controls:
    c = source_controls("extend", "extend_source")
    with gr.Row():
        c["left_extend_length"] = gr.Number(0.0, label="Add before (s)", elem_id="extend-left")
        c["right_extend_length"] = gr.Number(10.0, label="Add after (s)", elem_id="extend-right")
    c.update(_text_controls("extend", " (empty: the source's)"))
    c.update(_seeds("extend", "extend_seeds"))
    with gr.Row():
        c.update(_dit_controls())
        c.update(_format())
    return c


def cover_controls() -> Controls:
    c = source_controls("cover", "cover_source")
    c.update(_text_controls("cover", " of the cover"))
    c["audio_cover_strength"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Cover strength",
                                          info="how closely the cover follows the source")
    c.update(_seeds("cover", "manual_seeds"))
    with gr.Row():
        c.update(_dit_controls())
        c.update(_format())
    return c


def understand_controls() -> Controls:
    return {"source_audio": gr.Audio(type="filepath", sources=["upload"], label="Audio", elem_id="understand-audio"),
            "audio_codes": gr.Textbox(label="or audio codes", lines=2, placeholder="<|audio_code_123|>..."),
            "temperature": gr.Slider(0.0, 2.0, value=0.85, step=0.05, label="Temperature")}
