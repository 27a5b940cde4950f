"""``acestep``: the command line of the serving stack.

    acestep generate --caption "..." [--lyrics-file F] [--duration S] [--task-type cover --src-audio F]
                     [--batch-size N] [--audio-format flac] [--params p.json] [--config c.json] --out DIR
                     (every GenerationParams / GenerationConfig field has a flag: acestep generate --help)
    acestep generate ... --lora ID[:SCALE] [--lora ID2:0.5]   (LoRA adapters, blended when repeated)
    acestep generate ... --detach                      (prints the job id)
    acestep retake JOB_ID [--item N] [--seeds A,B] [--variance V] --out DIR
    acestep extend (JOB_ID [--item N] | --src-audio F) [--left S] [--right S] --out DIR
    acestep edit (JOB_ID [--item N] | --src-audio F) [--mode only_lyrics|remix] [--target-caption C]
                 [--target-lyrics L | --target-lyrics-file F] [--n-min A] [--n-max B] --out DIR
    acestep watch JOB_ID [--out DIR] / acestep get JOB_ID [--out DIR]
    acestep understand (--codes "<|audio_code_1|>..." | --audio F)
    acestep create-sample --query "..."
    acestep format-sample --caption "..." --lyrics-file F
    acestep serve --checkpoints DIR [--studio [--studio-port 7865]]
    acestep studio [--gateway HOST:PORT] [--port 7865]   (the web page; acestep studio --help)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from gateway import sdk, studio_commands
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


# Flags of ``generate``: every GenerationParams / GenerationConfig field, grouped as the inference API
# document groups them. The LM's outputs (``cot_*``) are not inputs.
PARAM_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text inputs", ("caption", "lyrics", "instrumental")),
    ("music metadata", ("bpm", "keyscale", "timesignature", "vocal_language", "duration")),
    ("generation parameters", ("inference_steps", "guidance_scale", "seed")),
    ("advanced DiT parameters", ("use_adg", "cfg_interval_start", "cfg_interval_end", "shift", "infer_method",
                                 "timesteps", "cfg_type")),
    ("task-specific parameters", ("task_type", "instruction", "reference_audio", "src_audio", "audio_codes",
                                  "repainting_start", "repainting_end", "audio_cover_strength", "track_name",
                                  "track_classes")),
    ("studio operations (retake / extend / edit; also: acestep retake, extend, edit)",
     ("source_request_id", "source_item_index", "retake_seeds", "retake_variance", "extend_left_seconds",
      "extend_right_seconds", "edit_mode", "edit_target_caption", "edit_target_lyrics", "edit_n_min", "edit_n_max")),
    ("5Hz LM parameters", ("thinking", "lm_temperature", "lm_cfg_scale", "lm_top_k", "lm_top_p",
                           "lm_negative_prompt", "use_cot_metas", "use_cot_caption", "use_cot_language",
                           "use_cot_lyrics", "use_constrained_decoding")),
    ("LoRA", ("lora_id", "lora_scale", "loras")),
)
CONFIG_GROUP = ("GenerationConfig", ("batch_size", "allow_lm_batch", "use_random_seed", "seeds",
                                     "lm_batch_chunk_size", "constrained_decoding_debug", "audio_format"))
# Short spellings kept from earlier releases of this CLI.
ALIASES = {"task_type": ["--task"], "inference_steps": ["--steps"], "guidance_scale": ["--guidance"],
           "vocal_language": ["--language"], "repainting_start": ["--repaint-start"],
           "repainting_end": ["--repaint-end"], "track_name": ["--track"], "audio_format": ["--format"],
           "loras": ["--lora"]}
LIST_FIELDS = {"timesteps": float, "track_classes": str, "seeds": int, "retake_seeds": int}
FIELD_HELP = {
    "caption": "text description of the music (at most 512 characters)",
    "lyrics": "lyrics ('[Instrumental]' for none; --lyrics-file reads them from a file)",
    "instrumental": "an instrumental whatever the lyrics say",
    "bpm": "beats per minute, 30-300; unset: planned by the LM",
    "keyscale": "key, e.g. 'C Major', 'Am', 'F# minor'; empty: planned by the LM",
    "timesignature": "2, 3, 4 or 6 (2/4, 3/4, 4/4, 6/8)",
    "vocal_language": "ISO 639-1 code, or 'unknown' to detect",
    "duration": "seconds, 10-600; <= 0 chooses it from the lyrics (or the LM plans it)",
    "seed": "-1: random; a seed given here turns --use-random-seed off unless that is given too",
    "timesteps": "comma-separated custom schedule from 1.0 to 0.0 (overrides --inference-steps and --shift)",
    "src_audio": "source audio file (cover, repaint, lego, extract, complete)",
    "reference_audio": "reference audio file (timbre/style)",
    "track_classes": "comma-separated tracks for task 'complete'",
    "seeds": "comma-separated per-item seeds (fewer than --batch-size: the rest random)",
    "lora_id": "adapter id (default: none)",
    "cfg_type": "guidance rule of base models: apg, cfg or cfg_star (--use-adg picks ADG)",
    "source_request_id": "retake/extend/edit: the job whose item is the source",
    "retake_seeds": "comma-separated retake seeds, one item each",
    "retake_variance": "0: the source item's noise, 1: the retake seed's",
    "edit_mode": "only_lyrics (keeps the caption) or remix (edit_target_caption)",
    "edit_n_min": "edited slice of the trajectory, 0 = data end, 1 = noise end",
    "edit_n_max": "0 leaves the source unchanged",
    "lora_scale": "weight of the lora_id adapter, 0-1",
    "loras": "adapter to apply, ID or ID:SCALE (scale 0-1, default 1); repeat to blend several",
}


def _add_field(group, name: str, default: Any) -> None:
    flags = [f"--{name.replace('_', '-')}", *ALIASES.get(name, [])]
    help_text = FIELD_HELP.get(name, "")
    if isinstance(default, bool):
        group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {default})".strip())
        return
    if name == "loras":
        group.add_argument(*flags, dest=name, action="append", type=_lora_weight, default=None,
                           metavar="ID[:SCALE]", help=help_text)
        return
    if name in LIST_FIELDS:
        cast = LIST_FIELDS[name]
        group.add_argument(*flags, dest=name, default=None, metavar="A,B,...",
                           type=lambda text, cast=cast: [cast(part) for part in text.split(",") if part.strip()],
                           help=help_text)
        return
    cast = type(default) if default is not None else (int if name == "bpm" else str)
    group.add_argument(*flags, dest=name, type=cast, default=None,
                       help=f"{help_text} (default: {default!r})".strip())


def _lora_weight(text: str) -> tuple[str, float]:
    """``ID`` or ``ID:SCALE`` -> ``(ID, SCALE)`` (scale 1 when omitted)."""
    lora_id, _, scale = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return lora_id, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora takes ID or ID:SCALE, got {text!r}") from None


def _read_json(path: Optional[str], what: str) -> dict[str, Any]:
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise SystemExit(f"{what} must hold a JSON object of {what} fields")
    return data


def _from_args(cls: type, args: argparse.Namespace, base: dict[str, Any]) -> Any:
    """``cls`` from the JSON file's values, overridden by every flag given on the command line."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise SystemExit(f"unknown {cls.__name__} fields in the JSON file: {', '.join(unknown)}")
    values = dict(base)
    for name in known:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    return cls(**values)


def _params(args: argparse.Namespace) -> GenerationParams:
    if args.lyrics_file:
        args.lyrics = Path(args.lyrics_file).read_text()
    return _from_args(GenerationParams, args, _read_json(args.params, "GenerationParams"))


def _config(args: argparse.Namespace) -> GenerationConfig:
    if args.seeds and len(args.seeds) == 1:
        args.seeds = args.seeds[0]  # a single int, as the document allows
    if args.seed is not None and args.seed >= 0 and args.use_random_seed is None:
        args.use_random_seed = False  # asking for a seed means wanting it
    return _from_args(GenerationConfig, args, _read_json(args.config, "GenerationConfig"))


def cmd_generate(args: argparse.Namespace) -> int:
    params, config = _params(args), _config(args)
    if args.detach:
        print(sdk.submit(_client(args), params, config))
        return 0
    return _follow(args, lambda show: sdk.generate_music(_client(args), params, config, save_dir=args.out,
                                                         on_event=show))


def cmd_watch(args: argparse.Namespace) -> int:
    return _follow(args, lambda show: sdk.get_result(_client(args), args.job_id, save_dir=args.out, on_event=show))


def cmd_get(args: argparse.Namespace) -> int:
    return _follow(args, lambda show: sdk.get_result(_client(args), args.job_id, save_dir=args.out), quiet=True)


def _follow(args: argparse.Namespace, run: Callable[[Callable[[Any], None]], Any], quiet: bool = False) -> int:
    """Run a generation (live or a job), with a progress bar per stage, and print its files."""
    bar = StageBar()
    started = time.perf_counter()

    def show(event: Any) -> None:
        if event.WhichOneof("event") == "progress" and not quiet:
            bar.update(event.progress)

    result = run(show)
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


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, use_constrained_decoding=args.use_constrained_decoding,
                constrained_decoding_debug=args.constrained_decoding_debug)


def cmd_understand(args: argparse.Namespace) -> int:
    return _print_result(sdk.understand_music(_client(args), audio_codes=args.codes or "", audio=args.audio,
                                              **_sampling(args)))


def cmd_create_sample(args: argparse.Namespace) -> int:
    return _print_result(sdk.create_sample(_client(args), args.query, instrumental=args.instrumental,
                                           vocal_language=args.language, **_sampling(args)))


def cmd_format_sample(args: argparse.Namespace) -> int:
    lyrics = Path(args.lyrics_file).read_text() if args.lyrics_file else (args.lyrics or "")
    metadata = _read_json(args.user_metadata, "user_metadata") if args.user_metadata else None
    return _print_result(sdk.format_sample(_client(args), args.caption, lyrics, user_metadata=metadata,
                                           **_sampling(args)))


def _add_sampling_flags(parser: argparse.ArgumentParser, temperature: float = 0.85) -> None:
    group = parser.add_argument_group("sampling (as the document's helper functions)")
    group.add_argument("--temperature", type=float, default=temperature)
    group.add_argument("--top-k", type=int, default=None, help="default: off")
    group.add_argument("--top-p", type=float, default=None, help="default: off")
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--use-constrained-decoding", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--constrained-decoding-debug", action="store_true")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the stack until SIGTERM or SIGINT (Ctrl-C), or until a service exits; then stop every
    service (SIGTERM, SIGKILL of its process group after --stop-grace-s). If this process is killed
    outright, the services get SIGTERM from the kernel and a watchdog SIGKILLs what is left."""
    from gateway.serve import LocalStack, StopRequested

    workdir = {"workdir": Path(args.workdir)} if args.workdir else {}
    stack = LocalStack(Path(args.checkpoints), lm_model=args.lm_model, dit_model=args.dit_model,
                       num_dit=args.num_dit, with_lm=not args.no_lm, device=args.device,
                       gateway_args=["--port", str(args.port)] if args.port else [],
                       with_http=not args.no_http, http_args=["--port", str(args.http_port)],
                       drain_grace_s=args.drain_grace_s, stop_grace_s=args.stop_grace_s, **workdir)
    with stack.stop_on_signals():
        try:
            address = stack.start()
            print(f"gateway serving on {address} (logs in {stack.workdir}); Ctrl-C to stop", flush=True)
            if not args.no_http:
                print(f"HTTP API on {stack.http_url} (OpenAPI document: {stack.http_url}/docs)", flush=True)
            if args.studio:
                print(f"studio on {_start_studio(stack, args)}", flush=True)
            exited = stack.wait_for_exit()
            print(f"{exited.name} exited with {exited.process.returncode}; stopping the stack", file=sys.stderr,
                  flush=True)
            return 1
        except (StopRequested, KeyboardInterrupt) as stop:
            name = stop.signal_name if isinstance(stop, StopRequested) else "SIGINT"
            print(f"{name}: stopping the stack...", file=sys.stderr, flush=True)
            return 0
        finally:
            stack.stop()


def _start_studio(stack: Any, args: argparse.Namespace) -> str:
    """The studio as one more service of the stack (stopped with it); returns its URL."""
    studio = stack._spawn("studio", "studio", ["--gateway", stack.services["gateway"].address,
                                               "--host", args.studio_host, "--port", str(args.studio_port)])
    studio.wait_port(120.0, stack.check_stop)
    return f"http://{args.studio_host}:{studio.port}"


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default="127.0.0.1:50050", help="gateway host:port")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to connect with TLS")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate songs", description=(
        "Every GenerationParams and GenerationConfig field of the inference API has a flag; "
        "--params/--config take the SDK's dicts as JSON files, flags override them."))
    _add_connection_flags(p)
    files = p.add_argument_group("files")
    files.add_argument("--params", default=None, help="JSON object of GenerationParams fields")
    files.add_argument("--config", default=None, help="JSON object of GenerationConfig fields")
    files.add_argument("--lyrics-file", default=None, help="read --lyrics from this file")
    files.add_argument("--out", default="out", help="folder the audio files are written to")
    files.add_argument("--detach", action="store_true",
                       help="start the job and print its id (then: acestep watch ID / acestep get ID)")
    param_defaults = {f.name: _default_of(f) for f in dataclasses.fields(GenerationParams)}
    for title, names in PARAM_GROUPS:
        group = p.add_argument_group(f"GenerationParams: {title}")
        for name in names:
            _add_field(group, name, param_defaults[name])
    config_defaults = {f.name: _default_of(f) for f in dataclasses.fields(GenerationConfig)}
    title, names = CONFIG_GROUP
    group = p.add_argument_group(title)
    for name in names:
        _add_field(group, name, config_defaults[name])
    p.set_defaults(func=cmd_generate)


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep", description="ACE-Step serving stack client")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    studio_commands.add_parsers(sub, _add_connection_flags, _follow, _client)
    for name, func, text in (("watch", cmd_watch, "follow a job (progress bars) and save its files"),
                             ("get", cmd_get, "wait for a job and save its files")):
        p = sub.add_parser(name, help=text)
        _add_connection_flags(p)
        p.add_argument("job_id")
        p.add_argument("--out", default="out", help="folder the audio files are written to")
        p.set_defaults(func=func)
    p = sub.add_parser("understand", help="audio codes or audio → caption, lyrics, metadata")
    _add_connection_flags(p)
    p.add_argument("--codes", default=None, help="audio codes ('<|audio_code_N|>...')")
    p.add_argument("--audio", default=None, help="an audio file, encoded to codes by the DiT first")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_understand)
    p = sub.add_parser("create-sample", help="query → caption, lyrics, metadata")
    _add_connection_flags(p)
    p.add_argument("--query", required=True, help="natural-language description of the song")
    p.add_argument("--instrumental", action="store_true")
    p.add_argument("--language", "--vocal-language", dest="language", default=None,
                   help="restrict the lyrics to this language (e.g. en, zh, bn)")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_create_sample)
    p = sub.add_parser("format-sample", help="caption + lyrics → enhanced caption, metadata")
    _add_connection_flags(p)
    p.add_argument("--caption", required=True)
    p.add_argument("--lyrics", default=None)
    p.add_argument("--lyrics-file", default=None)
    p.add_argument("--user-metadata", default=None,
                   help="JSON file with the values to keep (bpm, duration, keyscale, timesignature, language)")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_format_sample)
    p = sub.add_parser("serve", help="start LM, DiT, gateway and the HTTP API locally")
    p.add_argument("--checkpoints", required=True)
    p.add_argument("--lm-model", default=None)
    p.add_argument("--dit-model", default=None)
    p.add_argument("--num-dit", type=int, default=1)
    p.add_argument("--no-lm", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=50050, help="gateway port (0: any free port)")
    p.add_argument("--http-port", type=int, default=8001, help="HTTP API port (0: any free port)")
    p.add_argument("--no-http", action="store_true", help="no HTTP API, gRPC only")
    p.add_argument("--studio", action="store_true", help="also the studio web page (acestep studio)")
    p.add_argument("--studio-port", type=int, default=7865, help="studio port (0: any free port)")
    p.add_argument("--studio-host", default="127.0.0.1", help="studio listen address (0.0.0.0: other machines)")
    p.add_argument("--workdir", default=None, help="folder of the services' logs and port files "
                                                  "(default: a new temporary folder)")
    p.add_argument("--drain-grace-s", type=float, default=5.0,
                   help="how long each service lets in-flight requests finish once told to stop")
    p.add_argument("--stop-grace-s", type=float, default=10.0,
                   help="on SIGTERM/SIGINT: how long to wait for the services before SIGKILL of their "
                        "process groups (a second signal does not wait)")
    p.set_defaults(func=cmd_serve)
    # The studio parses its own flags (acestep studio --help); see main().
    p = sub.add_parser("studio", add_help=False, help="the web page on port 7865, a client of the gateway")
    p.set_defaults(func=cmd_studio, studio_args=[])
    return parser


def cmd_studio(args: argparse.Namespace) -> int:
    """The studio is its own program (``python -m studio``): this process becomes it."""
    os.execv(sys.executable, [sys.executable, "-m", "studio", *args.studio_args])
    return 1  # not reached


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "studio":
        args.studio_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
