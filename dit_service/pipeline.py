"""``DitPipeline``: the loaded DiT, text encoder and VAE, and the three GPU stages of a batch.

The batcher's worker calls, in order, :meth:`DitPipeline.prepare` (sources, text, condition
encoder), :meth:`DitPipeline.denoise` and :meth:`DitPipeline.decode_tiles`. Request policy (which
tasks a variant supports, how a request maps to conditions) lives in :mod:`dit_service.planning`.

Rows of a running batch can be dropped between steps (a cancelled request): the decoder then
runs on the live rows only and the dropped rows' outputs are left at zero. Each row draws its
noise from its own seeded generator and every per-row computation (attention, guidance) stays
inside its row, so the remaining rows' results do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from dit_service import conditioning
from dit_service.conditioning import RowInputs
from dit_service.denoise import Conditions, DenoiseInputs, denoise
from dit_service.flow_edit import EditInputs, flow_edit
from dit_service.lora.layers import BatchAdapters, LoraRouter, install_lora_layers
from dit_service.model.weights import LoadedDiT, load_dit
from dit_service.planning import RequestPlan, RowSpec
from dit_service.prompts import dit_prompts
from dit_service.text_encoder import TextEncoder
from dit_service.vae import AudioTile, EncodeMode, Vae
from shared.errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

TEXT_ENCODER_DIR = "Qwen3-Embedding-0.6B"
VAE_DIR = "vae"
LiveRows = Callable[[], Sequence[int]]


@dataclass(frozen=True)
class PreparedBatch:
    """Denoiser inputs of a batch plus each row's own length in latent frames."""

    inputs: DenoiseInputs
    num_frames: tuple[int, ...]
    adapters: tuple = ()  # per row: its LoRA blend ((adapter, scale), ...); empty: none
    edit: Optional[EditInputs] = None   # an edit batch runs the flow edit instead of ``denoise``


class DitPipeline:
    """Holds the components (the VAE possibly on its own device). ``decode_tiles`` runs on the decode
    thread, the other methods on the diffusion worker thread."""

    def __init__(self, dit: LoadedDiT, text_encoder: TextEncoder, vae: Vae, *, name: str,
                 vae_encode_mode: EncodeMode = EncodeMode.SAMPLE) -> None:
        if dit.silence_latent is None:
            raise InvalidArgument(f"the DiT checkpoint {name} has no silence_latent.pt", field="checkpoints")
        channels = dit.config.audio_acoustic_hidden_dim
        if vae.latent_channels != channels:
            raise InvalidArgument(
                f"the VAE decodes {vae.latent_channels}-channel latents but the DiT uses {channels}",
                field="checkpoints",
            )
        if text_encoder.hidden_size != dit.config.text_hidden_dim:
            raise InvalidArgument(
                f"the text encoder is {text_encoder.hidden_size} wide but the DiT expects "
                f"text_hidden_dim {dit.config.text_hidden_dim}", field="checkpoints"
            )
        self.model = dit.model
        self.lora = install_lora_layers(self.model.decoder)  # per-row adapters; the base math is unchanged
        self.config = dit.config
        self.silence_latent = dit.silence_latent  # [1, T_sil, 64]
        self.text_encoder = text_encoder
        self.vae = vae
        self.name = name
        self.vae_encode_mode = vae_encode_mode

    @classmethod
    def load(cls, checkpoints: str | Path, model_name: str, device: str, dtype: torch.dtype,
             vae_encode_mode: EncodeMode = EncodeMode.SAMPLE, vae_device: Optional[str] = None) -> DitPipeline:
        """Load ``<checkpoints>/<model_name>``, ``Qwen3-Embedding-0.6B`` and ``vae``.

        The VAE lives on ``vae_device`` (default: ``device``), in float32 on a CPU and in ``dtype``
        elsewhere (the reference's policy). Its decoded tiles come back on the CPU and its encoded
        latents are moved to ``device``, so the two devices never meet inside one computation.
        """
        root = Path(checkpoints)
        dit_dir = root / model_name
        if not (dit_dir / "config.json").is_file():
            raise InvalidArgument(f"no DiT checkpoint at {dit_dir} (config.json missing)", field="model")
        dit = load_dit(dit_dir, dtype=dtype, device=device)
        text_encoder = TextEncoder.load(root / TEXT_ENCODER_DIR, dtype=dtype, device=device)
        vae_device = vae_device or device
        vae_dtype = torch.float32 if torch.device(vae_device).type == "cpu" else dtype
        vae = Vae.load(root / VAE_DIR, dtype=vae_dtype, device=vae_device)
        return cls(dit, text_encoder, vae, name=model_name, vae_encode_mode=vae_encode_mode)

    @property
    def is_turbo(self) -> bool:
        return bool(self.config.is_turbo)

    @property
    def device(self) -> torch.device:
        return self.silence_latent.device

    @property
    def dtype(self) -> torch.dtype:
        return self.silence_latent.dtype

    @property
    def sample_rate_hz(self) -> int:
        return self.vae.sample_rate_hz

    @property
    def hop_samples(self) -> int:
        return self.vae.hop_samples

    def prepare(self, rows: Sequence[RowSpec]) -> PreparedBatch:
        """Sources (VAE, codes), text encoders and condition encoder for ``rows``.

        Every row of a batch shares the sampler and guidance settings and the cover strength (the
        batcher's compatibility key guarantees it).
        """
        for plan in {id(row.plan): row.plan for row in rows}.values():
            self.prepare_sources(plan)
        if rows[0].plan.edit is not None:
            return self._prepare_edit(rows)
        row_inputs = [self._row_inputs(row) for row in rows]
        batch = conditioning.assemble(row_inputs, self.silence_latent, self.dtype, self.device)
        prompts = [dit_prompts(row.plan.text_for(row), row.plan.audio_cover_strength) for row in rows]
        conditions = self._conditions([p.text_prompt for p in prompts], [p.lyrics_prompt for p in prompts], batch,
                                      batch.src_latents, batch.is_covers, batch.hints)
        plan = rows[0].plan
        non_cover = None
        if plan.audio_cover_strength < 1.0 and bool(batch.is_covers.any()):
            texts = [p.non_cover_text_prompt if row.plan.is_cover else p.text_prompt for p, row in zip(prompts, rows)]
            no_covers = torch.zeros_like(batch.is_covers)
            non_cover = self._conditions(texts, [p.lyrics_prompt for p in prompts], batch, batch.non_cover_src,
                                         no_covers, None)
        inputs = DenoiseInputs(
            conditions=conditions, sampling=plan.sampling, guidance=plan.guidance, seeds=[row.seed for row in rows],
            non_cover=non_cover, audio_cover_strength=plan.audio_cover_strength if non_cover else 1.0,
            repaint=batch.repaint, noise_mix=[row.noise_mix for row in rows],
        )
        return PreparedBatch(inputs=inputs, num_frames=batch.num_frames,
                             adapters=tuple(tuple(row.plan.adapters) for row in rows))

    def _prepare_edit(self, rows: Sequence[RowSpec]) -> PreparedBatch:
        """Source and target conditions (text2music context) and the clean source latents of an edit batch."""
        row_inputs = [RowInputs(num_frames=row.plan.num_frames_for(row), refer_latents=row.plan.refer_latents)
                      for row in rows]
        batch = conditioning.assemble(row_inputs, self.silence_latent, self.dtype, self.device)
        sources = [dit_prompts(row.plan.text_for(row), 1.0) for row in rows]
        targets = [dit_prompts(row.plan.target_text_for(row), 1.0) for row in rows]
        no_covers = torch.zeros_like(batch.is_covers)
        source = self._conditions([p.text_prompt for p in sources], [p.lyrics_prompt for p in sources], batch,
                                  batch.src_latents, no_covers, None)
        target = self._conditions([p.text_prompt for p in targets], [p.lyrics_prompt for p in targets], batch,
                                  batch.src_latents, no_covers, None)
        clean = conditioning.source_rows(
            [RowInputs(num_frames=spec.num_frames, src_latents=row.plan.src_latents)
             for spec, row in zip(row_inputs, rows)], self.silence_latent, self.dtype, self.device)  # [B, T, 64]
        plan = rows[0].plan
        inputs = DenoiseInputs(conditions=source, sampling=plan.sampling, guidance=plan.guidance,
                               seeds=[row.seed for row in rows], noise_mix=[row.noise_mix for row in rows])
        edit = EditInputs(source=inputs, target=target, src_latents=clean, n_min=plan.edit.n_min,
                          n_max=plan.edit.n_max)
        return PreparedBatch(inputs=inputs, num_frames=batch.num_frames,
                             adapters=tuple(tuple(row.plan.adapters) for row in rows), edit=edit)

    def denoise(self, prepared: PreparedBatch, *, live_rows: LiveRows,
                on_step: Optional[Callable[[int, int], None]] = None) -> Tensor:
        """Latents ``[B, T, 64]``; rows not in ``live_rows()`` stop being computed (their values are
        meaningless). Raises ``Cancelled`` when no row is live any more."""
        adapters = BatchAdapters.build(prepared.adapters) if prepared.adapters else None
        proxy = _LiveRowModel(self.model, prepared.inputs.conditions.context_latents.shape[0], live_rows,
                              self.lora, adapters)
        with self.lora.use(adapters):
            if prepared.edit is not None:
                return flow_edit(proxy, prepared.edit, on_step=on_step, should_stop=lambda: not live_rows())
            return denoise(proxy, prepared.inputs, on_step=on_step, should_stop=lambda: not live_rows())

    def decode_tiles(self, latents: Tensor, num_frames: Sequence[int], live_rows: LiveRows) -> Iterator[AudioTile]:
        """VAE tiles over the longest row; each tile decodes the live rows that have not ended yet."""

        def select(core_start: int) -> list[int]:
            return [i for i in live_rows() if num_frames[i] > core_start]

        yield from self.vae.decode_tiles(latents[:, : max(num_frames)], select=select)

    def encode_audio(self, audio: np.ndarray, seed: int = 0) -> tuple[Tensor, list[int]]:
        """48 kHz stereo ``[2, S]`` -> (latents ``[S // hop, 64]`` float32 CPU, 5 Hz audio codes)."""
        latents = self.encode_latents(audio, seed)  # [T, 64]
        with torch.no_grad():
            _, indices, _ = self.model.tokenize(latents[None].to(self.dtype), self.silence_latent)  # [1, T5, 1]
        return latents.float().cpu(), [int(code) for code in indices.flatten().tolist()]

    def encode_latents(self, audio: np.ndarray, seed: int) -> Tensor:
        """VAE latents ``[S // hop, 64]`` (model dtype, device) of 48 kHz stereo audio ``[2, S]``."""
        generator = torch.Generator().manual_seed(seed) if self.vae_encode_mode == EncodeMode.SAMPLE else None
        waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]  # [1, 2, S]
        latents = self.vae.encode(waveform, self.vae_encode_mode, generator)[0]  # [T, C]
        if latents.shape[-1] != self.config.audio_acoustic_hidden_dim:
            raise Internal(
                f"the VAE encodes {latents.shape[-1]}-channel latents but the DiT uses "
                f"{self.config.audio_acoustic_hidden_dim}; the VAE's encoder_hidden_size must be twice that"
            )
        return latents.to(device=self.device, dtype=self.dtype)

    def prepare_sources(self, plan: RequestPlan) -> None:
        """Encode a request's source and reference once (cached on the plan; reused by later batches)."""
        if plan.prepared:
            return
        if plan.src_audio is not None:
            plan.src_latents = self.encode_latents(plan.src_audio, plan.vae_seed)
        elif plan.given_src_latents is not None:
            plan.src_latents = torch.from_numpy(plan.given_src_latents).to(device=self.device, dtype=self.dtype)
        if plan.src_latents is not None and plan.source_plan is not None:
            plan.src_latents = conditioning.pad_source(plan.src_latents, plan.source_plan, self.silence_latent)
        if plan.refer_audio is not None:
            clip = conditioning.reference_clip(plan.refer_audio, plan.vae_seed)
            plan.refer_latents = self.encode_latents(clip, plan.vae_seed)[: conditioning.TIMBRE_FRAMES]
        if plan.is_cover and plan.src_latents is not None:
            with torch.no_grad():
                quantized, _, _ = self.model.tokenize(plan.src_latents[None], self.silence_latent)
                plan.cover_hints = self.model.detokenize(quantized)[0]  # [T5 * 5, 64]
        plan.prepared = True

    def _row_inputs(self, row: RowSpec) -> RowInputs:
        plan = row.plan
        hints = plan.cover_hints
        if row.codes:
            indices = torch.tensor(row.codes, dtype=torch.long, device=self.device)[None, :, None]  # [1, T5, 1]
            with torch.no_grad():
                hints = self.model.codes_to_latents(indices)[0]  # [5 * T5, 64]
        window = plan.source_plan.window if plan.source_plan is not None else None
        windows = plan.source_plan.windows if plan.source_plan is not None else ()
        return RowInputs(
            num_frames=plan.num_frames_for(row), is_cover=plan.is_cover, src_latents=plan.src_latents, hints=hints,
            window=window, silence_window=plan.task_type in ("repaint", "extend"), refer_latents=plan.refer_latents,
            windows=windows,
        )

    @torch.no_grad()
    def _conditions(self, texts: list[str], lyrics: list[str], batch: conditioning.BatchInputs, src: Tensor,
                    is_covers: Tensor, hints: Optional[Tensor]) -> Conditions:
        text = self.text_encoder.encode_captions(texts)
        lyric = self.text_encoder.embed_lyrics(lyrics)
        states, _, context = self.model.prepare_condition(
            text.hidden.to(self.dtype), text.mask, lyric.hidden.to(self.dtype), lyric.mask,
            batch.refer_packed, batch.refer_order, hidden_states=src, attention_mask=None,
            silence_latent=self.silence_latent, src_latents=src, chunk_masks=batch.chunk_masks,
            is_covers=is_covers, precomputed_lm_hints_25Hz=hints,
        )
        return Conditions(encoder_hidden_states=states, context_latents=context)


class _LiveRowModel:
    """The model as ``denoise`` sees it, with a decoder that computes only the live rows."""

    def __init__(self, model: Any, num_rows: int, live_rows: LiveRows, lora: LoraRouter,
                 adapters: Optional[BatchAdapters]) -> None:
        self.null_condition_emb = model.null_condition_emb
        self.decoder = _LiveRowDecoder(model.decoder, num_rows, live_rows, lora, adapters)


class _LiveRowDecoder:
    def __init__(self, decoder: Any, num_rows: int, live_rows: LiveRows, lora: LoraRouter,
                 adapters: Optional[BatchAdapters]) -> None:
        self._decoder, self._num_rows, self._live_rows = decoder, num_rows, live_rows
        self._lora, self._adapters = lora, adapters
        self._selected: tuple[tuple[int, ...], Optional[BatchAdapters]] = ((), None)

    def precompute_cross_kv(self, encoder_hidden_states: Tensor) -> Any:
        return self._decoder.precompute_cross_kv(encoder_hidden_states)

    def __call__(self, x: Tensor, t: Tensor, r: Tensor, enc: Optional[Tensor], context: Tensor,
                 cross_kv: Any = None) -> Tensor:
        """Velocity ``[B or 2B, T, 64]``; rows outside the live set are zero."""
        live = list(self._live_rows())
        if len(live) == self._num_rows:
            return self._decoder(x, t, r, enc, context, cross_kv=cross_kv)
        copies = x.shape[0] // self._num_rows  # 2 when the batch is doubled for CFG
        index = torch.tensor([c * self._num_rows + i for c in range(copies) for i in live], device=x.device)
        kv = None if cross_kv is None else tuple((k[index], v[index]) for k, v in cross_kv)
        out = torch.zeros_like(x)  # [B or 2B, T, 64]
        adapters = self._live_adapters(live)
        if len(index):
            with self._lora.use(adapters):  # the live rows keep their own adapters
                out[index] = self._decoder(x[index], t[index], r[index], None if enc is None else enc[index],
                                           context[index], cross_kv=kv)
        return out

    def _live_adapters(self, live: list[int]) -> Optional[BatchAdapters]:
        """The batch's adapters reduced to the live rows (kept while the live set stays the same)."""
        if self._adapters is None:
            return None
        if self._selected[0] != tuple(live):
            self._selected = (tuple(live), self._adapters.select(live))
        return self._selected[1]
