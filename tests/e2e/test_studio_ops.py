"""Retake, extend and edit through real gRPC on the tiny checkpoints (docs/studio.md).

Through the gateway: retake's properties (variance 0 is the original item bit for bit, variance 1
a fresh generation with the retake seed, the distance to the original grows with the variance),
extend's output length, edit's identities at the audio level (``edit_n_max = 0`` and an unchanged
caption and lyrics both give the VAE round trip of the source).

In latent space, on a DiT replica directly: extend's kept region and edit's identities and
determinism. The request passes the source as ``src_latents`` and asks for the result's latents
(``return_latents``), so the comparison is exact. Comparing audio instead would go through the
tiny VAE, whose random weights make ``decode(encode(x))`` nothing like ``x``.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from gateway import sdk
from shared import convert
from shared.audio_codes import format_codes
from shared.constants import LATENT_FRAMES_PER_SECOND, SAMPLE_RATE_HZ
from shared.pb.acestep.common.v1 import common_pb2
from shared.pb.acestep.dit.v1 import dit_pb2, dit_pb2_grpc
from shared.types import GenerationConfig, GenerationParams
from tests.e2e.conftest import SOURCE_SECONDS
from tests.e2e.helpers import quick_params, rpc_error

WAV = GenerationConfig(batch_size=1, seeds=[11], audio_format="wav")
RETAKE_SEED = 23
ORIGINAL_SECONDS = 2.0  # given audio codes fix the length (5 per second) below the 10 s duration minimum
SOURCE_FRAMES = 50       # latents a DiT replica is given directly (any values: the DiT takes them as they are)
ORIGINAL = quick_params(audio_codes=format_codes(range(100, 100 + int(ORIGINAL_SECONDS * 5))))
CROSSFADE_FRAMES = 10  # the repaint blend at each border of the kept source


def _waveform(result: sdk.GenerationResult) -> np.ndarray:
    assert result.success, result.error
    assert len(result.audios) == 1
    return result.audios[0].tensor.numpy()  # [2, S]


@pytest.fixture(scope="module")
def original(client) -> tuple[str, np.ndarray]:
    """A finished job of one short item: its id and its audio."""
    request_id = sdk.submit(client, ORIGINAL, WAV)
    return request_id, _waveform(sdk.get_result(client, request_id))


@pytest.fixture(scope="module")
def dit(stack) -> dit_pb2_grpc.DitServiceStub:
    channel = grpc.insecure_channel(stack.services["dit0"].address)
    yield dit_pb2_grpc.DitServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def source_latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((SOURCE_FRAMES, 64)).astype(np.float32)  # [T, 64]


def _latents_of(dit, params: GenerationParams, src: np.ndarray, seed: int = 5) -> np.ndarray:
    """The final latents ``[T, 64]`` of one item synthesized from ``src`` latents."""
    request = dit_pb2.SynthesizeRequest(
        params=convert.params_to_pb(params), items=[dit_pb2.SynthesisItem(seed=seed)], return_latents=True,
        audio_format=common_pb2.AUDIO_FORMAT_WAV,
        src_latents=dit_pb2.Tensor(shape=list(src.shape), float32_le=src.astype("<f4").tobytes()))
    done = [event.item_done for event in dit.Synthesize(request) if event.HasField("item_done")]
    assert len(done) == 1
    tensor = done[0].latents
    return np.frombuffer(tensor.float32_le, dtype="<f4").reshape(tuple(tensor.shape))


def test_retake_variance_moves_from_the_original_to_the_retake_seed(client, original) -> None:
    request_id, audio = original
    retakes = {variance: _waveform(sdk.retake(client, request_id, 0, [RETAKE_SEED], variance, audio_format="wav"))
               for variance in (0.0, 0.6, 1.0)}
    assert np.array_equal(retakes[0.0], audio)  # bit-identical to the original item
    fresh = _waveform(sdk.generate_music(client, ORIGINAL, GenerationConfig(
        batch_size=1, seeds=[RETAKE_SEED], audio_format="wav")))
    assert np.array_equal(retakes[1.0], fresh)  # a fresh generation with the retake seed (same params and codes)
    two = sdk.retake(client, request_id, 0, [RETAKE_SEED, RETAKE_SEED + 1], 0.3, audio_format="wav")
    assert two.success, two.error
    retakes[0.3] = two.audios[0].tensor.numpy()
    distances = [float(np.linalg.norm(retakes[v] - audio)) for v in (0.0, 0.3, 0.6, 1.0)]
    print("retake distance to the original by variance 0, 0.3, 0.6, 1:", [round(d, 3) for d in distances])
    assert distances == sorted(distances) and distances[0] == 0.0 < distances[1]
    recorded = [item.params for item in two.audios]  # each item says how to make it again
    assert [p["retake_seeds"] for p in recorded] == [[RETAKE_SEED], [RETAKE_SEED + 1]]
    assert all(p["task_type"] == "retake" and p["source_request_id"] == request_id for p in recorded)
    assert recorded[0]["audio_codes"] == ORIGINAL.audio_codes and two.audios[0].key != two.audios[1].key


def test_retake_of_an_unknown_job_is_not_found(stub) -> None:
    params = GenerationParams(task_type="retake", source_request_id="no-such-job", retake_seeds=[1])
    error = rpc_error(lambda: stub.Generate(sdk.build_request(params, GenerationConfig(batch_size=1))))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "no-such-job" in error.details()


def test_extend_of_a_finished_item_adds_both_sides_in_one_call(client, original) -> None:
    request_id, audio = original
    result = sdk.extend(client, (request_id, 0), left_seconds=1.0, right_seconds=0.6,
                        config=GenerationConfig(batch_size=1, seeds=[3], audio_format="wav"))
    assert _waveform(result).shape[-1] == audio.shape[-1] + round((1.0 + 0.6) * SAMPLE_RATE_HZ)
    recorded = result.audios[0].params
    assert (recorded["task_type"], recorded["source_request_id"], recorded["caption"]) == \
        ("extend", request_id, ORIGINAL.caption)  # the item's caption, as the request left it unset


def test_extend_keeps_the_source_latents_between_the_new_ends(dit, source_latents: np.ndarray) -> None:
    params = GenerationParams(task_type="extend", caption="lo-fi piano loop", extend_left_seconds=1.0,
                              extend_right_seconds=0.6)
    out = _latents_of(dit, params, source_latents)
    left, right, frames = LATENT_FRAMES_PER_SECOND, 15, source_latents.shape[0]
    assert out.shape == (left + frames + right, source_latents.shape[1])
    core = slice(CROSSFADE_FRAMES, frames - CROSSFADE_FRAMES)
    assert np.array_equal(out[left:left + frames][core], source_latents[core])  # kept exactly
    assert not np.array_equal(out[left:left + CROSSFADE_FRAMES], source_latents[:CROSSFADE_FRAMES])  # blended


def test_edit_changes_the_source_only_through_the_condition(dit, source_latents: np.ndarray) -> None:
    params = GenerationParams(task_type="edit", caption="lo-fi piano loop", lyrics="[verse] old words")
    untouched = _latents_of(dit, GenerationParams(**{**params.to_dict(), "edit_n_max": 0.0}), source_latents)
    assert np.array_equal(untouched, source_latents)
    same_text = _latents_of(dit, GenerationParams(**{**params.to_dict(), "edit_target_lyrics": params.lyrics}),
                            source_latents)
    assert np.array_equal(same_text, source_latents)
    new_words = GenerationParams(**{**params.to_dict(), "edit_target_lyrics": "[verse] new words"})
    edited = _latents_of(dit, new_words, source_latents)
    assert edited.shape == source_latents.shape and not np.array_equal(edited, source_latents)
    assert np.array_equal(_latents_of(dit, new_words, source_latents), edited)  # deterministic for a seed
    assert not np.array_equal(_latents_of(dit, new_words, source_latents, seed=6), edited)


def test_edit_through_the_gateway(client, source_wav: bytes) -> None:
    described = GenerationParams(caption="lo-fi piano loop", lyrics="[verse] old words")
    config = GenerationConfig(batch_size=1, seeds=[9], audio_format="wav")

    def edit(**options) -> np.ndarray:
        return _waveform(sdk.edit(client, source_wav, params=described, config=config, **options))

    round_trip = edit(target_lyrics="[verse] new words", n_max=0.0)  # the source through the VAE
    assert np.array_equal(edit(target_lyrics=described.lyrics), round_trip)  # nothing changed: the source
    assert round_trip.shape[-1] == round(SOURCE_SECONDS * SAMPLE_RATE_HZ)
    remix = sdk.edit(client, source_wav, mode="remix", params=described, config=config)
    assert not remix.success and "edit_target_caption" in remix.error

