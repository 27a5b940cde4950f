"""``acestep retake | extend | edit``: the studio operations on the command line (docs/studio.md).

    acestep retake JOB_ID [--item N] [--seeds A,B] [--variance V] [--out DIR]
    acestep extend (JOB_ID [--item N] | --src-audio F) [--left S] [--right S] [--caption C] [--out DIR]
    acestep edit (JOB_ID [--item N] | --src-audio F) [--mode only_lyrics|remix] [--target-caption C]
                 [--target-lyrics L | --target-lyrics-file F] [--n-min A] [--n-max B] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from gateway import sdk
from shared.types import GenerationConfig, GenerationParams

AUDIO_FORMATS = ("flac", "wav", "mp3", "ogg")
Follow = Callable[[argparse.Namespace, Callable[[Callable[[Any], None]], Any]], int]


def _seeds(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _source(args: argparse.Namespace) -> Any:
    """``(job_id, item)`` or the ``--src-audio`` path: exactly one of them."""
    if bool(args.job_id) == bool(args.src_audio):
        raise SystemExit(f"acestep {args.command}: give a JOB_ID (with --item) or --src-audio, one of them")
    return (args.job_id, args.item) if args.job_id else args.src_audio


def _request(args: argparse.Namespace) -> tuple[GenerationParams, GenerationConfig]:
    """Params from --params (a JSON object), --caption and --lyrics[-file]; the config from --seeds, --format."""
    values = json.loads(Path(args.params).read_text()) if args.params else {}
    if not isinstance(values, dict):
        raise SystemExit("--params must hold a JSON object of GenerationParams fields")
    lyrics = Path(args.lyrics_file).read_text() if args.lyrics_file else args.lyrics
    values.update({name: value for name, value in (("caption", args.caption), ("lyrics", lyrics)) if value is not None})
    try:
        params = GenerationParams(**values)
    except TypeError as error:
        raise SystemExit(f"--params: {error}") from None
    seeds = args.seeds or []
    return params, GenerationConfig(batch_size=max(1, len(seeds)), seeds=seeds or None, audio_format=args.format)


def add_parsers(sub: Any, connection_flags: Callable[[argparse.ArgumentParser], None], follow: Follow,
                client: Callable[[argparse.Namespace], sdk.AceStepClient]) -> None:
    """The three sub-commands; ``follow`` runs a generation with progress bars and prints its files."""

    def retake(args: argparse.Namespace) -> int:
        return follow(args, lambda show: sdk.retake(
            client(args), args.job_id, args.item, args.seeds, args.variance, save_dir=args.out,
            audio_format=args.format, on_event=show, src_audio=args.src_audio, reference_audio=args.reference_audio))

    def extend(args: argparse.Namespace) -> int:
        source, (params, config) = _source(args), _request(args)
        return follow(args, lambda show: sdk.extend(client(args), source, args.left, args.right, params, config,
                                                    save_dir=args.out, on_event=show))

    def edit(args: argparse.Namespace) -> int:
        source, (params, config) = _source(args), _request(args)
        lyrics = Path(args.target_lyrics_file).read_text() if args.target_lyrics_file else args.target_lyrics
        return follow(args, lambda show: sdk.edit(client(args), source, args.mode, args.target_caption, lyrics,
                                                  args.n_min, args.n_max, params, config, save_dir=args.out,
                                                  on_event=show))

    p = sub.add_parser("retake", help="a finished item again, its noise mixed with new seeds")
    p.add_argument("job_id")
    p.add_argument("--seeds", type=_seeds, default=None, metavar="A,B,...", help="retake seeds, one item each")
    p.add_argument("--variance", type=float, default=0.5, help="0: the same item, 1: a fresh seed (default 0.5)")
    p.add_argument("--src-audio", default=None, help="the upload the item was made from, if any")
    p.add_argument("--reference-audio", default=None, help="the reference audio the item was made with, if any")
    _common(p, connection_flags, retake)
    p = sub.add_parser("extend", help="new music before and/or after a finished item or an audio file")
    _source_flags(p)
    p.add_argument("--left", type=float, default=0.0, help="seconds of new music before the source")
    p.add_argument("--right", type=float, default=0.0, help="seconds of new music after the source")
    _common(p, connection_flags, extend)
    p = sub.add_parser("edit", help="new lyrics or a new caption for a finished item or an audio file")
    _source_flags(p)
    p.add_argument("--mode", choices=("only_lyrics", "remix"), default="only_lyrics")
    p.add_argument("--target-caption", default="", help="remix: the new caption")
    p.add_argument("--target-lyrics", default="", help="the new lyrics (empty: the source's)")
    p.add_argument("--target-lyrics-file", default=None)
    p.add_argument("--n-min", type=float, default=0.0, help="edited slice: 0 = data end, 1 = noise end")
    p.add_argument("--n-max", type=float, default=1.0, help="0 leaves the source unchanged")
    _common(p, connection_flags, edit)


def _source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", nargs="?", default=None, help="the job whose item is the source")
    p.add_argument("--src-audio", default=None, help="a source audio file instead of a job's item")
    p.add_argument("--seeds", type=_seeds, default=None, metavar="A,B,...", help="seeds, one item each")
    p.add_argument("--caption", default=None, help="the source's caption (default: the item's)")
    p.add_argument("--lyrics", default=None, help="the source's lyrics (default: the item's)")
    p.add_argument("--lyrics-file", default=None)
    p.add_argument("--params", default=None, help="JSON object of further GenerationParams fields")


def _common(p: argparse.ArgumentParser, connection_flags: Callable[[argparse.ArgumentParser], None],
            func: Callable[[argparse.Namespace], int]) -> None:
    connection_flags(p)
    p.add_argument("--item", type=int, default=0, help="item index of the job (default 0)")
    p.add_argument("--format", default="flac", choices=AUDIO_FORMATS)
    p.add_argument("--out", default="out", help="folder the audio files are written to")
    p.set_defaults(func=func)
