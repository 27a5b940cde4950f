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

.PHONY: install system-deps protos test test-fast lint demo bench bench-dit bench-lm soak conformance tiny clean

install: $(STAMP) protos system-deps

# Servers the tests start for real (redis-server for the multi-replica job store), from Debian's packages.
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v redis-server >/dev/null || { echo "redis-server is required (Debian package redis-server)" >&2; exit 1; }

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
	$(PY) -m pyflakes shared/*.py lm_service dit_service gateway http_service conformance devtools tests examples
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

soak: install
	$(PY) -m tests.load.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) shared/pb/acestep .pytest_cache
