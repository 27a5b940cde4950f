"""The page's form values become the SDK's requests: v1's parameter names, sources, seeds."""

from __future__ import annotations

import pytest

from studio import forms
from studio.forms import InvalidInput, SourceRef

RESULT = {"request_id": "job-1", "item_index": 1, "format": "wav",
          "params": {"caption": "lo-fi piano", "lyrics": "[verse] rain"}}


@pytest.mark.parametrize("text, seeds", [("", []), (None, []), ("12345", [12345]), ("1, 2,3", [1, 2, 3]),
                                         ("4 5", [4, 5]), (7, [7])])
def test_seeds_are_integers_separated_by_commas_or_spaces(text, seeds) -> None:
    assert forms.parse_seeds(text, "manual_seeds") == seeds


def test_a_bad_seed_names_the_field() -> None:
    with pytest.raises(InvalidInput, match="manual_seeds must be integers") as caught:
        forms.parse_seeds("12, x", "manual_seeds")
    assert caught.value.field == "manual_seeds"


def test_the_guides_text2music_values_map_to_generation_params() -> None:
    params, config = forms.generate_request(dict(format="wav", audio_duration=-1, prompt="pop, upbeat",
                                                 lyrics="[verse] hi", infer_step=60, guidance_scale=15,
                                                 cfg_type="apg", manual_seeds="12345", batch_size=2, bpm=0))
    assert (params.caption, params.lyrics, params.duration, params.inference_steps) == ("pop, upbeat", "[verse] hi",
                                                                                      -1.0, 60)
    assert (params.guidance_scale, params.cfg_type, params.use_adg, params.bpm) == (15.0, "apg", False, None)
    assert (config.audio_format, config.batch_size, config.seeds, config.use_random_seed) == ("wav", 2, [12345], False)


def test_adg_is_a_guidance_choice_and_unknown_ones_are_refused() -> None:
    params, _ = forms.generate_request(dict(prompt="x", cfg_type="adg"))
    assert params.use_adg is True
    with pytest.raises(InvalidInput, match="cfg_type must be one of apg, cfg, cfg_star, adg"):
        forms.generate_request(dict(prompt="x", cfg_type="erg"))


def test_retake_takes_its_source_from_the_parameters_json() -> None:
    params, config = forms.retake_request(dict(json_data=RESULT, retake_variance=0.3, retake_seeds="67890, 5"))
    assert (params.task_type, params.source_request_id, params.source_item_index) == ("retake", "job-1", 1)
    assert (params.retake_seeds, params.retake_variance) == ([67890, 5], 0.3)
    assert (config.batch_size, config.audio_format) == (2, "wav")  # one item per seed, the source's format
    params, config = forms.retake_request(dict(json_data=RESULT))
    assert params.retake_seeds == [-1] and config.batch_size == 1  # one random retake
    with pytest.raises(InvalidInput, match="json_data names no result"):
        forms.retake_request(dict(json_data={}))
    with pytest.raises(InvalidInput, match="at most 4 seeds"):
        forms.retake_request(dict(json_data=RESULT, retake_seeds="1,2,3,4,5"))


def test_the_source_is_the_sent_result_or_the_upload() -> None:
    assert forms.pick_source(dict(json_data=RESULT, extend_source="text2music"), "extend_source") == \
        SourceRef("job-1", 1)
    assert forms.pick_source(dict(json_data=RESULT, extend_source="upload", source_audio="/a.wav"),
                             "extend_source") == "/a.wav"
    # v1's scripts pass extend_source="text2music" with an upload and no result: the upload it is
    assert forms.pick_source(dict(extend_source="text2music", source_audio="/a.wav"), "extend_source") == "/a.wav"
    with pytest.raises(InvalidInput, match="no source audio: upload a file"):
        forms.pick_source(dict(json_data=RESULT, edit_source="upload"), "edit_source")


def test_edit_keeps_the_sources_text_where_no_new_text_is_given() -> None:
    params, _ = forms.edit_request(dict(json_data=RESULT, edit_type="only_lyrics", edit_lyrics="[verse] sun",
                                        edit_n_min=0.6, edit_n_max=1.0), SourceRef("job-1", 1))
    assert (params.task_type, params.edit_mode, params.source_request_id) == ("edit", "only_lyrics", "job-1")
    assert (params.caption, params.edit_target_caption) == ("lo-fi piano", "lo-fi piano")
    assert (params.lyrics, params.edit_target_lyrics) == ("[verse] rain", "[verse] sun")
    assert (params.edit_n_min, params.edit_n_max) == (0.0, 0.4)  # v1's (0.6, 1.0), counted from the data end
    params, _ = forms.edit_request(dict(edit_type="remix", edit_prompt="rock", edit_n_min=0.2, edit_n_max=0.4),
                                   "/a.wav")
    assert (params.src_audio, params.edit_target_caption, params.source_request_id) == ("/a.wav", "rock", "")
    assert (params.edit_n_min, params.edit_n_max) == (0.6, 0.8)


def test_extend_sets_both_sides_in_one_request() -> None:
    params, _ = forms.extend_request(dict(json_data=RESULT, left_extend_length=3, right_extend_length=5),
                                     SourceRef("job-1", 1))
    assert (params.task_type, params.extend_left_seconds, params.extend_right_seconds) == ("extend", 3.0, 5.0)
    assert (params.source_request_id, params.source_item_index, params.caption) == ("job-1", 1, "lo-fi piano")
