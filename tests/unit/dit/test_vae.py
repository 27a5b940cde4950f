"""The VAE wrapper: overlap-discard tiling, streaming tiles, seeded encode, post-processing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderOobleck

from dit_service.vae import EncodeMode, Vae, Window, anti_clip, check_latents, tile_windows
from shared.errors import Internal

HOP = 6


class PointwiseDecoder(torch.nn.Module):
    """Each latent frame becomes ``HOP`` samples of its channel mean (no context: tiling is exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(downsampling_ratios=[2, 3], sampling_rate=48, audio_channels=2,
                                      decoder_input_channels=4)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.window_lengths: list[int] = []

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        self.window_lengths.append(z.shape[-1])
        mono = z.mean(dim=1, keepdim=True).repeat_interleave(HOP, dim=-1)  # [B, 1, T * HOP]
        return SimpleNamespace(sample=torch.cat([mono, -mono], dim=1))


def pointwise(latents: torch.Tensor) -> torch.Tensor:
    mono = latents.mean(dim=-1).repeat_interleave(HOP, dim=-1)[:, None]  # [B, 1, T * HOP]
    return torch.cat([mono, -mono], dim=1)


def test_windows_partition_the_signal_and_carry_overlap_context():
    windows = tile_windows(1000, 512, 64)
    assert [(w.core_start, w.core_end) for w in windows] == [(0, 384), (384, 768), (768, 1000)]
    assert windows[0] == Window(0, 448, 0, 384)
    assert windows[1] == Window(320, 832, 384, 768)
    assert windows[2] == Window(704, 1000, 768, 1000)
    assert tile_windows(512, 512, 64) == [Window(0, 512, 0, 512)]


@pytest.mark.parametrize("total", [1, 37, 384, 385, 15000])
def test_window_cores_abut_and_windows_stay_in_range(total):
    windows = tile_windows(total, 512, 64)
    assert windows[0].core_start == 0 and windows[-1].core_end == total
    for before, after in zip(windows, windows[1:]):
        assert before.core_end == after.core_start
    for w in windows:
        assert 0 <= w.start <= w.core_start < w.core_end <= w.end <= total and w.end - w.start <= 512


def test_decode_tiles_stream_in_order_and_concatenate_to_the_whole_decode():
    model = PointwiseDecoder()
    vae = Vae(model, decode_chunk_frames=10, decode_overlap_frames=2)
    latents = torch.randn(2, 37, 4)
    tiles = list(vae.decode_tiles(latents))
    assert [t.start_sample for t in tiles] == [i * 6 * HOP for i in range(math.ceil(37 / 6))]
    assert all(t.rows == (0, 1) for t in tiles)
    assert max(model.window_lengths) <= 10
    assert torch.allclose(torch.cat([t.audio for t in tiles], dim=-1), pointwise(latents))
    assert vae.decode(latents).shape == (2, 2, 37 * HOP)


def test_decode_tiles_decode_only_selected_rows_and_stop_when_none_is_left():
    vae = Vae(PointwiseDecoder(), decode_chunk_frames=10, decode_overlap_frames=2)
    latents = torch.randn(3, 37, 4)
    tiles = list(vae.decode_tiles(latents, select=lambda start: [r for r in (0, 2) if start < 12 or r == 2]
                                  if start < 24 else []))
    assert [t.rows for t in tiles] == [(0, 2), (0, 2), (2,), (2,)]
    assert torch.allclose(tiles[2].audio, pointwise(latents[2:3, 12:18]))


@pytest.fixture(scope="module")
def small_vae() -> Vae:
    torch.manual_seed(0)
    model = AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[2, 4, 4, 6, 10],
                               channel_multiples=[1, 1, 1, 1, 1], decoder_channels=4, decoder_input_channels=4,
                               audio_channels=2, sampling_rate=48_000)
    return Vae(model, encode_chunk_s=0.2, encode_overlap_s=0.04)  # 5-frame windows, 1 frame of context


def test_encode_is_tiled_to_one_frame_per_hop(small_vae):
    audio = torch.rand(1, 2, 24_000 + 100) * 2 - 1  # 12 frames and a partial hop
    assert small_vae.hop_samples == 1920 and small_vae.encode_chunk_frames == 5
    latents = small_vae.encode(audio, EncodeMode.MODE)
    assert latents.shape == (1, 12, 4)


def test_sampled_encode_is_reproducible_from_its_generator(small_vae):
    audio = torch.rand(1, 2, 24_000) * 2 - 1
    draw = lambda seed: small_vae.encode(audio, EncodeMode.SAMPLE, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert torch.equal(small_vae.encode(audio, EncodeMode.MODE), small_vae.encode(audio, EncodeMode.MODE))


def test_untiled_mode_encode_is_the_posterior_mean(small_vae):
    audio = torch.rand(1, 2, 4 * 1920) * 2 - 1
    expected = small_vae.model.encode(audio).latent_dist.mean.transpose(1, 2)
    assert torch.allclose(small_vae.encode(audio, EncodeMode.MODE), expected)


def test_non_finite_and_all_zero_latents_are_internal_errors():
    good = torch.randn(3, 10, 64)
    check_latents(good)
    bad = good.clone()
    bad[1, 4, 7] = float("nan")
    with pytest.raises(Internal, match=r"NaN or Inf latents \(batch rows \[1\]\)"):
        check_latents(bad)
    zero = good.clone()
    zero[2] = 0
    with pytest.raises(Internal, match=r"all-zero latents \(batch rows \[2\]\)"):
        check_latents(zero)


def test_anti_clip_scales_only_items_that_exceed_full_scale():
    audio = torch.tensor([[[0.5, -2.0]], [[0.25, -0.5]]])  # [2, 1, 2]
    out = anti_clip(audio)
    assert torch.allclose(out[0], torch.tensor([[0.25, -1.0]])) and torch.equal(out[1], audio[1])
