"""``acestep``: the command line of the serving stack.

    acestep generate --caption "..." [--lyrics-file F] [--duration S] [--task cover --src-audio F]
                     [--batch-size N] [--format flac] --out DIR
    acestep understand (--codes "<|audio_code_1|>..." | --audio F)
    acestep create-sample --query "..."
    acestep format-sample --caption "..." --lyrics-file F
    acestep serve --checkpoints DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from gateway import sdk
from shared.pb.acestep.common.v1 import common_pb2
from shared.types import GenerationConfig, GenerationParams

STAGE_NAMES = {
    common_pb2.STAGE_QUEUED: "queued",
    common_pb2.STAGE_LM_METADATA: "lm: metadata",
    common_pb2.STAGE_LM_CODES: "lm: audio codes",
    common_pb2.STAGE_CONDITIONING: "conditioning",
    common_pb2.STAGE_DIFFUSION: "diffusion",
    common_pb2.STAGE_DECODE: "vae decode",
    common_pb2.STAGE_ENCODE: "encode",
}


class StageBar:
    """One progress bar per stage on a terminal; one line per update otherwise."""

    def __init__(self, stream=sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.stage: Optional[int] = None
        self.is_tty = stream.isatty()
        self.last_line = ""
        self.last_printed = -1.0

    def update(self, progress: common_pb2.Progress) -> None:
        if self.stage is not None and progress.stage != self.stage and self.is_tty:
            self.stream.write("\n")
        self.stage = progress.stage
        filled = int(self.width * min(max(progress.fraction, 0.0), 1.0))
        bar = "#" * filled + "." * (self.width - filled)
        count = f" {progress.current}/{progress.total}" if progress.total else ""
        line = f"{STAGE_NAMES.get(progress.stage, 'working'):<16} [{bar}] {progress.fraction * 100:5.1f}%{count}"
        if self.is_tty:
            self.stream.write("\r" + line)
        elif self._worth_a_line(progress):
            self.stream.write(line + "\n")
        self.last_line = line
        self.stream.flush()

    def _worth_a_line(self, progress: common_pb2.Progress) -> bool:
        """Without a terminal: a line per stage change and per 25% step, not per token."""
        new_stage = progress.stage != getattr(self, "_printed_stage", None)
        if new_stage or progress.fraction >= 1.0 or progress.fraction - self.last_printed >= 0.25:
            self._printed_stage = progress.stage
            self.last_printed = progress.fraction if not new_stage else 0.0
            return True
        return False

    def close(self) -> None:
        if self.is_tty and self.stage is not None:
            self.stream.write("\n")


def _client(args: argparse.Namespace) -> sdk.AceStepClient:
    certs = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return sdk.AceStepClient(args.gateway, api_key=args.api_key, root_certificates=certs, timeout_s=args.timeout)


def _params(args: argparse.Namespace) -> GenerationParams:
    lyrics = Path(args.lyrics_file).read_text() if args.lyrics_file else (args.lyrics or "")
    return GenerationParams(
        task_type=args.task, caption=args.caption, lyrics=lyrics, instrumental=args.instrumental,
        duration=args.duration, bpm=args.bpm, keyscale=args.keyscale or "", timesignature=args.timesignature or "",
        vocal_language=args.language, inference_steps=args.steps, shift=args.shift, thinking=not args.no_thinking,
        src_audio=args.src_audio, reference_audio=args.reference_audio, audio_codes=args.audio_codes or "",
        repainting_start=args.repaint_start, repainting_end=args.repaint_end, track_name=args.track or "",
        guidance_scale=args.guidance, seed=args.seed if args.seed is not None else -1)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _params(args)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    config = GenerationConfig(batch_size=args.batch_size, audio_format=args.format, seeds=seeds,
                              use_random_seed=seeds is None and args.seed is None)
    bar = StageBar()
    started = time.perf_counter()

    def show(event: Any) -> None:
        if event.WhichOneof("event") == "progress":
            bar.update(event.progress)

    result = sdk.generate_music(_client(args), params, config, save_dir=args.out, on_event=show)
    bar.close()
    if not result.success:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    for audio in result.audios:
        print(f"{audio.path}  key={audio.key} seed={audio.params['seed']}")
    costs = result.extra_outputs.get("time_costs", {})
    print(f"done in {time.perf_counter() - started:.1f} s; time costs: "
          + ", ".join(f"{k}={v:.2f}s" for k, v in sorted(costs.items())))
    return 0


def _print_result(result: Any) -> int:
    if not result.success:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(result), indent=2, ensure_ascii=False))
    return 0


def cmd_understand(args: argparse.Namespace) -> int:
    return _print_result(sdk.understand_music(_client(args), audio_codes=args.codes or "", audio=args.audio,
                                              temperature=args.temperature))


def cmd_create_sample(args: argparse.Namespace) -> int:
    return _print_result(sdk.create_sample(_client(args), args.query, instrumental=args.instrumental,
                                           vocal_language=args.language, temperature=args.temperature))


def cmd_format_sample(args: argparse.Namespace) -> int:
    lyrics = Path(args.lyrics_file).read_text() if args.lyrics_file else (args.lyrics or "")
    return _print_result(sdk.format_sample(_client(args), args.caption, lyrics, temperature=args.temperature))


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.serve import LocalStack

    stack = LocalStack(Path(args.checkpoints), lm_model=args.lm_model, dit_model=args.dit_model,
                       num_dit=args.num_dit, with_lm=not args.no_lm, device=args.device,
                       gateway_args=["--port", str(args.port)] if args.port else [])
    try:
        address = stack.start()
        print(f"gateway serving on {address} (logs in {stack.workdir}); Ctrl-C to stop", flush=True)
        while all(s.process.poll() is None for s in stack.services.values()):
            time.sleep(0.5)
        print("a service exited; stopping the stack", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr)
        return 0
    finally:
        stack.stop()


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default="127.0.0.1:50050", help="gateway host:port")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to connect with TLS")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate songs")
    _add_connection_flags(p)
    p.add_argument("--caption", default="")
    p.add_argument("--lyrics", default=None)
    p.add_argument("--lyrics-file", default=None)
    p.add_argument("--instrumental", action="store_true")
    p.add_argument("--duration", type=float, default=-1.0)
    p.add_argument("--bpm", type=int, default=None)
    p.add_argument("--keyscale", default=None)
    p.add_argument("--timesignature", default=None)
    p.add_argument("--language", default="unknown")
    p.add_argument("--task", default="text2music")
    p.add_argument("--src-audio", default=None)
    p.add_argument("--reference-audio", default=None)
    p.add_argument("--audio-codes", default=None)
    p.add_argument("--repaint-start", type=float, default=0.0)
    p.add_argument("--repaint-end", type=float, default=-1.0)
    p.add_argument("--track", default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--no-thinking", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--seeds", default=None, help="comma-separated per-item seeds")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--format", default="flac", choices=["flac", "wav", "mp3", "ogg"])
    p.add_argument("--out", default="out")
    p.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep", description="ACE-Step serving stack client")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    p = sub.add_parser("understand", help="audio codes or audio → caption, lyrics, metadata")
    _add_connection_flags(p)
    p.add_argument("--codes", default=None)
    p.add_argument("--audio", default=None)
    p.add_argument("--temperature", type=float, default=0.85)
    p.set_defaults(func=cmd_understand)
    p = sub.add_parser("create-sample", help="query → caption, lyrics, metadata")
    _add_connection_flags(p)
    p.add_argument("--query", required=True)
    p.add_argument("--instrumental", action="store_true")
    p.add_argument("--language", default=None)
    p.add_argument("--temperature", type=float, default=0.85)
    p.set_defaults(func=cmd_create_sample)
    p = sub.add_parser("format-sample", help="caption + lyrics → enhanced caption, metadata")
    _add_connection_flags(p)
    p.add_argument("--caption", required=True)
    p.add_argument("--lyrics", default=None)
    p.add_argument("--lyrics-file", default=None)
    p.add_argument("--temperature", type=float, default=0.85)
    p.set_defaults(func=cmd_format_sample)
    p = sub.add_parser("serve", help="start LM, DiT and gateway locally")
    p.add_argument("--checkpoints", required=True)
    p.add_argument("--lm-model", default=None)
    p.add_argument("--dit-model", default=None)
    p.add_argument("--num-dit", type=int, default=1)
    p.add_argument("--no-lm", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=50050)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
