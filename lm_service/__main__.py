"""``acestep-lm --checkpoints DIR --model acestep-5Hz-lm-1.7B --device cuda:0``: the LM service.

config → load the engine (vLLM, or transformers where vLLM is absent) → warm up → serve.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional

from lm_service.engine.config import LmEngineConfig
from lm_service.plan import Planner
from lm_service.prompts import default_chat_template
from lm_service.runtime import LmRuntime, SamplingInput
from lm_service.servicer import LmServicer
from lm_service.tasks import LmTasks
from shared import metrics
from shared.config import add_server_flags, env_default, export_for_workers, server_config_from_args
from shared.grpc_server import GrpcServer, ServiceBinding, run_service, write_port_file
from shared.pb.acestep.lm.v1 import lm_pb2_grpc
from shared.telemetry import setup_tracing

log = logging.getLogger("lm_service")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acestep-lm", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=env_default("checkpoints", "checkpoints"))
    parser.add_argument("--model", default=env_default("lm_model", "acestep-5Hz-lm-1.7B"))
    parser.add_argument("--device", default=env_default("lm_device", "cpu"), help="cpu or cuda:N")
    parser.add_argument("--backend", default=env_default("lm_backend", "auto"), choices=["auto", "vllm", "hf"])
    parser.add_argument("--dtype", default=env_default("lm_dtype", "auto"))
    parser.add_argument("--max-model-len", type=int, default=env_default("lm_max_model_len", 4096, int))
    parser.add_argument("--max-num-seqs", type=int, default=env_default("lm_max_num_seqs", 64, int))
    parser.add_argument("--kv-cache-gib", type=float, default=env_default("lm_kv_cache_gib", 1.0, float),
                        help="KV cache size on CPU; on a GPU vLLM sizes it from --gpu-memory-utilization")
    parser.add_argument("--gpu-memory-utilization", type=float,
                        default=env_default("lm_gpu_memory_utilization", 0.9, float),
                        help="vLLM's share of the GPU's memory (lower it when the DiT shares the GPU)")
    parser.add_argument("--max-active", type=int, default=env_default("lm_max_active", 0, int),
                        help="work units served at once (a task, or one code item of a plan); "
                             "0: half of --max-num-seqs (every unit may be a guided pair)")
    parser.add_argument("--max-pending", type=int, default=env_default("lm_max_pending", 64, int),
                        help="work units waiting for a slot beyond which new ones get RESOURCE_EXHAUSTED")
    parser.add_argument("--max-duration-s", type=int, default=env_default("lm_max_duration_s", 600, int),
                        help="largest duration the constrained CoT may plan")
    parser.add_argument("--max-text-tokens", type=int, default=env_default("lm_max_text_tokens", 0, int),
                        help="cap of the text phases' token budget (CoT, understand/create/format); "
                             "0: the reference's (3500); audio codes are never capped")
    parser.add_argument("--lm-strict-cot", action="store_true", default=env_default("lm_strict_cot", False, bool),
                        help="tightened CoT decoding rules instead of the reference's (see metadata_fsm.py)")
    parser.add_argument("--genres-vocab", default=env_default("lm_genres_vocab", ""),
                        help="genre vocabulary file, 'builtin' (packaged list) or 'none'; default: the "
                             "checkpoint's genres_vocab.txt when present, else none (free-text genres)")
    add_server_flags(parser, default_port=50051)
    return parser.parse_args(argv)


def engine_config(args: argparse.Namespace) -> LmEngineConfig:
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    views = Path(tempfile.gettempdir()) / "acestep-lm-views"
    return LmEngineConfig(model_dir=Path(args.checkpoints) / args.model, dtype=dtype,
                          max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          kv_cache_gib=args.kv_cache_gib if device == "cpu" else 0.0,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          enforce_eager=device == "cpu", device=device, views_dir=str(views))


def build_engine(config: LmEngineConfig, backend: str):
    """vLLM when installed (or asked for), else the transformers backend."""
    if backend in ("auto", "vllm"):
        try:
            from lm_service.engine.vllm_engine import VllmLmEngine
        except ImportError:
            if backend == "vllm":
                raise
        else:
            return VllmLmEngine(config)
    from lm_service.engine.hf_backend import HfLmEngine

    return HfLmEngine(config)


async def warm_up(runtime: LmRuntime) -> None:
    """One short constrained CoT so that every code path (and the worker's vocab tables) is ready."""
    from lm_service.constraints.spec import ConstraintSpec
    from lm_service.prompts import cot_prompt

    request = runtime.request(cot_prompt("warm-up", ""), ConstraintSpec(phase="cot", stop_at_reasoning=True),
                              SamplingInput(temperature=0.0, seed=0), max_new_tokens=8, request_id="warm-up")
    await runtime.run(request)


async def export_stats(engine, interval_s: float = 1.0) -> None:
    while True:
        stats = engine.stats()
        metrics.LM_RUNNING_SEQUENCES.set(stats.num_running_seqs)
        metrics.LM_WAITING_SEQUENCES.set(stats.num_waiting_seqs)
        await asyncio.sleep(interval_s)


async def serve(args: argparse.Namespace) -> None:
    config = server_config_from_args("acestep-lm", args)
    setup_tracing(config.service_name, config.otlp_endpoint)
    engine_cfg = engine_config(args)
    export_for_workers("lm_max_duration_s", args.max_duration_s)  # read inside the engine workers
    export_for_workers("lm_genres_vocab", args.genres_vocab)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(engine_cfg.model_dir))
    engine = build_engine(engine_cfg, args.backend)
    runtime = LmRuntime(engine, tokenizer, tokenizer.chat_template or default_chat_template(), args.max_model_len,
                        args.max_text_tokens)
    max_active = args.max_active or max(1, args.max_num_seqs // 2)
    servicer = LmServicer(Planner(runtime, args.lm_strict_cot), LmTasks(runtime, args.lm_strict_cot),
                          max_active, args.max_pending)
    binding = ServiceBinding(lm_pb2_grpc.add_LmServiceServicer_to_server, servicer, "acestep.lm.v1.LmService")
    server = GrpcServer(config, [binding])
    port = await server.start()
    server.install_signal_handlers()
    await engine.start()
    await warm_up(runtime)
    stats_task = asyncio.ensure_future(export_stats(engine))
    await server.mark_serving()
    write_port_file(args.port_file, port, server.metrics_port)
    log.info("LM service serving %s on port %d with %s", args.model, port, type(engine).__name__)
    await server.wait()
    stats_task.cancel()
    await engine.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
