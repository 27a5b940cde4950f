"""Every Prometheus metric the services export, defined once (names are part of the contract:
the Kubernetes autoscalers and the Grafana dashboard read them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# Every gRPC server (shared.grpc_server interceptor).
RPC_REQUESTS = Counter("acestep_rpc_requests_total", "RPCs finished, by status code",
                       ["service", "method", "code"])
RPC_LATENCY = Histogram("acestep_rpc_latency_seconds", "RPC wall time", ["service", "method"],
                        buckets=_LATENCY_BUCKETS)
RPC_IN_FLIGHT = Gauge("acestep_rpc_in_flight", "RPCs being served", ["service", "method"])

# DiT service.
DIT_QUEUE_DEPTH = Gauge("acestep_dit_queue_depth", "Synthesize items admitted and waiting for a batch")
DIT_ACTIVE_ITEMS = Gauge("acestep_dit_active_items", "Items in the running diffusion batch")
DIT_BATCH_SIZE = Histogram("acestep_dit_batch_size", "Items per diffusion batch", buckets=(1, 2, 3, 4, 6, 8, 12, 16))
DIT_BATCH_REQUESTS = Histogram("acestep_dit_batch_requests", "Distinct requests per diffusion batch",
                               buckets=(1, 2, 3, 4, 6, 8))
DIT_STEP_SECONDS = Histogram("acestep_dit_step_seconds", "One diffusion step of a batch", buckets=_LATENCY_BUCKETS)
DIT_CONDITION_SECONDS = Histogram("acestep_dit_condition_seconds", "Conditioning of a batch",
                                  buckets=_LATENCY_BUCKETS)
DIT_DECODE_SECONDS = Histogram("acestep_dit_decode_seconds", "VAE decode of one item", buckets=_LATENCY_BUCKETS)
DIT_ITEMS = Counter("acestep_dit_items_total", "Items synthesized, by outcome", ["outcome"])
DIT_REJECTED = Counter("acestep_dit_rejected_total", "Requests refused at admission (queue full)")
DIT_STAGE_BUSY_SECONDS = Counter("acestep_dit_stage_busy_seconds_total",
                                 "Seconds a DiT worker stage spent working (rate() is its busy fraction)", ["stage"])
DIT_STAGE_BUSY_FRACTION = Gauge("acestep_dit_stage_busy_fraction",
                                "Share of the last window a DiT worker stage spent working", ["stage"])
DIT_DECODE_QUEUE_DEPTH = Gauge("acestep_dit_decode_queue_depth", "Denoised batches waiting for the VAE decode")
DIT_DECODE_BACKPRESSURE = Counter("acestep_dit_decode_backpressure_total",
                                  "Times diffusion waited for room in the full decode queue")

# LM service.
LM_RUNNING_SEQUENCES = Gauge("acestep_lm_running_sequences", "Sequences in the engine's running batch")
LM_WAITING_SEQUENCES = Gauge("acestep_lm_waiting_sequences", "Sequences waiting in the engine")
LM_QUEUE_DEPTH = Gauge("acestep_lm_queue_depth",
                       "LM work admitted and waiting for a slot (units: a task, or a plan's code items)")
LM_ACTIVE_WORK = Gauge("acestep_lm_active_work", "LM work being served (units as acestep_lm_queue_depth)")
LM_GENERATED_TOKENS = Counter("acestep_lm_generated_tokens_total", "Tokens generated", ["phase"])
LM_TTFT_SECONDS = Histogram("acestep_lm_time_to_first_token_seconds", "Time to first generated token",
                            buckets=_LATENCY_BUCKETS)
LM_PHASE_SECONDS = Histogram("acestep_lm_phase_seconds", "LM phase wall time", ["phase"], buckets=_LATENCY_BUCKETS)
LM_REJECTED = Counter("acestep_lm_rejected_total", "Requests refused at admission (queue full)")

# Gateway.
GATEWAY_ACTIVE_REQUESTS = Gauge("acestep_gateway_active_requests", "Generate requests in progress")
GATEWAY_SONGS = Counter("acestep_gateway_songs_total", "Songs (items) finished, by outcome", ["outcome"])
GATEWAY_STAGE_SECONDS = Histogram("acestep_gateway_stage_seconds", "Time per pipeline stage", ["stage"],
                                  buckets=_LATENCY_BUCKETS)
GATEWAY_RETRIES = Counter("acestep_gateway_retries_total", "Backend calls retried on another replica", ["backend"])
GATEWAY_QUEUED_REQUESTS = Gauge("acestep_gateway_queued_requests", "Generate requests waiting for a slot")
GATEWAY_REJECTED = Counter("acestep_gateway_rejected_total", "Requests refused at admission")
GATEWAY_BACKEND_HEALTHY = Gauge("acestep_gateway_backend_healthy", "1 if a backend replica is serving",
                                ["backend", "target"])

AUTOSCALING_METRICS = ("acestep_dit_queue_depth", "acestep_lm_queue_depth", "acestep_lm_waiting_sequences")
