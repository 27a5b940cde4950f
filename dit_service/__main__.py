"""``acestep-dit --checkpoints DIR --model acestep-v15-turbo --device cuda:0``: the DiT service.

config -> load the DiT, text encoder and VAE -> warm-up batch -> SERVING -> serve; SIGTERM
drains in-flight requests, then stops the batcher.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

from dit_service.engine import DitEngine, EngineConfig
from dit_service.lora.registry import MIB
from dit_service.pipeline import DitPipeline
from dit_service.servicer import DitServicer
from dit_service.vae import EncodeMode
from shared.config import add_server_flags, env_default, server_config_from_args
from shared.errors import InvalidArgument
from shared.grpc_server import GrpcServer, ServiceBinding, run_service, write_port_file
from shared.pb.acestep.dit.v1 import dit_pb2_grpc
from shared.telemetry import setup_tracing

log = logging.getLogger("dit_service")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acestep-dit", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=env_default("checkpoints", "checkpoints"))
    parser.add_argument("--model", default=env_default("dit_model", "acestep-v15-turbo"),
                        help="DiT folder under --checkpoints (turbo, base, sft, ...)")
    parser.add_argument("--device", default=env_default("dit_device", "cpu"), help="cpu or cuda:N")
    parser.add_argument("--vae-device", default=env_default("dit_vae_device", ""),
                        help="device of the VAE (cpu or cuda:N); default: --device. Decode runs on its own "
                             "thread either way, overlapping the next batch's diffusion")
    parser.add_argument("--vae-queue-batches", type=int, default=env_default("dit_vae_queue_batches", 1, int),
                        help="denoised batches that may wait for the VAE decode before diffusion pauses; "
                             "0: decode on the diffusion thread (no pipelining)")
    parser.add_argument("--dtype", default=env_default("dit_dtype", "auto"), choices=["auto", *DTYPES],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-batch-items", type=int, default=env_default("dit_max_batch_items", 8, int))
    parser.add_argument("--max-queue", type=int, default=env_default("dit_max_queue", 64, int),
                        help="items waiting for a batch beyond which requests get RESOURCE_EXHAUSTED")
    parser.add_argument("--batch-window-ms", type=float, default=env_default("dit_batch_window_ms", 20.0, float),
                        help="how long a new request waits for others to share its batch")
    parser.add_argument("--vae-encode", default=env_default("dit_vae_encode", "sample"),
                        choices=[m.value for m in EncodeMode],
                        help="sample: seeded posterior draw (reference behaviour); mode: posterior mean")
    parser.add_argument("--no-warmup", action="store_true", default=env_default("dit_no_warmup", False, bool))
    parser.add_argument("--lora-dir", default=env_default("lora_dir", ""),
                        help="LoRA adapter folders (<id>/adapter_config.json + adapter_model.safetensors); "
                             "default: <checkpoints>/loras")
    parser.add_argument("--lora-cache-mb", type=float, default=env_default("lora_cache_mb", 1024.0, float),
                        help="device memory for loaded LoRA adapters (least recently used ones are evicted)")
    parser.add_argument("--lora-max-upload-mb", type=float, default=env_default("lora_max_upload_mb", 1024.0, float),
                        help="largest adapter_model.safetensors an upload may send")
    add_server_flags(parser, default_port=50052)
    return parser.parse_args(argv)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def engine_config(args: argparse.Namespace) -> EngineConfig:
    if args.vae_queue_batches < 0:
        raise InvalidArgument(f"--vae-queue-batches must be >= 0, got {args.vae_queue_batches}",
                              field="vae_queue_batches")
    for name in ("lora_cache_mb", "lora_max_upload_mb"):
        if not getattr(args, name) > 0:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}", field=name)
    return EngineConfig(max_batch_items=args.max_batch_items, max_queue=args.max_queue,
                        batch_window_s=args.batch_window_ms / 1000.0,
                        vae_queue_batches=args.vae_queue_batches,
                        lora_dir=Path(args.lora_dir or Path(args.checkpoints) / "loras"),
                        lora_cache_bytes=int(args.lora_cache_mb * MIB),
                        lora_max_upload_bytes=int(args.lora_max_upload_mb * MIB))


async def serve(args: argparse.Namespace) -> None:
    config = server_config_from_args("acestep-dit", args)
    setup_tracing(config.service_name, config.otlp_endpoint)
    dtype = resolve_dtype(args.dtype, args.device)
    vae_device = args.vae_device or args.device
    pipeline = await asyncio.to_thread(DitPipeline.load, args.checkpoints, args.model, args.device, dtype,
                                       EncodeMode(args.vae_encode), vae_device)
    engine = DitEngine(pipeline, engine_config(args))
    binding = ServiceBinding(dit_pb2_grpc.add_DitServiceServicer_to_server, DitServicer(engine),
                             "acestep.dit.v1.DitService")
    server = GrpcServer(config, [binding])
    port = await server.start()
    server.install_signal_handlers()
    await engine.start()
    if not args.no_warmup:
        await engine.warm_up()
    await server.mark_serving()
    write_port_file(args.port_file, port, server.metrics_port)
    log.info("DiT service serving %s (%s, VAE on %s, %s) on port %d", args.model, args.device, vae_device, dtype,
             port)
    await server.wait()
    await engine.stop()


def main(argv: Optional[list[str]] = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
