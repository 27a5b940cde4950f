# ACE-Step serving stack. `make test` and `make demo` work on a fresh machine (they install first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHECKPOINTS ?=
PYTEST_ARGS ?=
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_TARGET_DEVICE ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install system-deps protos test test-fast lint demo bench bench-dit bench-lm bench-lora bench-http soak conformance tiny clean
.PHONY: bench-gpu reference-checkout

install: $(STAMP) protos system-deps

# Servers and tools the tests start for real, from Debian's packages: redis-server (the multi-replica job
# store), chromium (the studio page test drives it through playwright; no browser is downloaded).
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v redis-server >/dev/null || { echo "redis-server is required (Debian package redis-server)" >&2; exit 1; }
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@command -v chromium >/dev/null || { echo "chromium is required for the studio page test (Debian packages chromium, chromium-driver)" >&2; exit 1; }

# Idempotent: re-runs only when the pinned dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -e ".[lm-cpu,test]"
	# PyPI's torchvision/torchaudio/torchcodec cannot load beside the CPU torch build (vLLM pulls them in).
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

protos: $(STAMP)
	$(PY) -m shared.protogen

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not vllm and not slow" $(PYTEST_ARGS)

lint: install
	$(PY) -m pyflakes shared/*.py lm_service dit_service gateway http_service studio conformance devtools tests examples
	$(PY) -m pytest -q tests/unit/test_layering.py

conformance: install
	$(VENV)/bin/acestep-conformance ../shared/golden

tiny: install
	$(VENV)/bin/acestep-make-tiny-checkpoints .checkpoints/tiny

demo: install
	$(PY) -m gateway.demo $(if $(CHECKPOINTS),--checkpoints $(CHECKPOINTS),)

bench: bench-dit bench-lm

bench-dit: install
	$(PY) -m dit_service.bench

bench-lm: install
	$(PY) -m lm_service.bench

# Per-row LoRA cost at batch 8 (tiny checkpoints on the CPU; BENCH_LORA_ARGS="--size 2b" on a GPU).
bench-lora: install
	$(PY) -m dit_service.bench_lora $(BENCH_LORA_ARGS)

# Latency the HTTP edge adds over direct gRPC: p50/p95 to the first progress event and to the result.
bench-http: install
	$(PY) -m http_service.bench $(BENCH_HTTP_ARGS)

soak: install
	$(PY) -m tests.load.soak $(SOAK_ARGS)

# One prepared run on one GPU (published sizes, random bf16 weights, <= 8 min): stage times, batching,
# LM codes/s, first PCM chunk, songs/min through the gateway, memory, beside the reference pipeline.
# At tiny size on a CPU: make bench-gpu DEVICE=cpu SIZE=tiny. Results: $(BENCH_OUT)/bench-gpu.{json,md}.
# Where no venv can be built (a lent GPU machine): make bench-gpu PY=python3 BENCH_GPU_DEPS=
DEVICE ?= cuda
SIZE ?= published
BENCH_OUT ?= $(if $(OUT),$(OUT),bench-out)
BENCH_GPU_DEPS ?= install
# Tiny on a 2-core CPU: shorter songs, smaller batches and fewer concurrent plans/requests (the tiny VAE
# decodes about 1 s of audio per CPU second; the reference's LM loop about 1 code per second).
BENCH_GPU_TINY_ARGS := --durations 10 --batches 1 4 --lm-codes 25 --lm-concurrency 1 4 --reference-lm-concurrency 1 \
	--stack-requests 4 --stack-duration 10 --reference-requests 1 --budget-s 600
BENCH_GPU_ARGS ?= $(if $(filter tiny,$(SIZE)),$(BENCH_GPU_TINY_ARGS),)
REFERENCE_SRC ?= $(ACESTEP_REFERENCE_SRC)
REFERENCE_REV ?= HEAD
REFERENCE_DIR ?= .reference/ACE-Step-1.5

# vLLM picks its platform from VLLM_TARGET_DEVICE, which this Makefile exports as cpu for the CPU build.
bench-gpu: $(BENCH_GPU_DEPS)
	VLLM_TARGET_DEVICE=$(if $(filter cpu,$(DEVICE)),cpu,cuda) $(PY) -m devtools.bench_gpu --device $(DEVICE) --size $(SIZE) --out $(BENCH_OUT) --reference-dir $(REFERENCE_DIR) \
		$(if $(REFERENCE_SRC),--reference-src $(REFERENCE_SRC) --reference-rev $(REFERENCE_REV),) $(BENCH_GPU_ARGS)

# The reference implementation (ace-step/ACE-Step-1.5) in an ignored folder, from a git dir or URL.
reference-checkout:
	@test -n "$(REFERENCE_SRC)" || { echo "give REFERENCE_SRC=<git dir or URL of ace-step/ACE-Step-1.5> (or ACESTEP_REFERENCE_SRC)" >&2; exit 2; }
	$(PY) -m devtools.bench_gpu.reference_checkout --src $(REFERENCE_SRC) --rev $(REFERENCE_REV) --dest $(REFERENCE_DIR)

clean:
	rm -rf $(VENV) shared/pb/acestep .pytest_cache
